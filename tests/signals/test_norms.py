import math

import numpy as np
import pytest
import torch

from keel.signals.norms import global_norm, per_tensor_norms, update_ratios


def _ref_norms(tensors):
    return np.array([np.sqrt((t.double().numpy() ** 2).sum()) for t in tensors])


def test_per_tensor_norms_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g) * 1e3, torch.randn(2, 2, 2, generator=g)]
    got = per_tensor_norms(tensors)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _ref_norms(tensors), rtol=1e-6)
    ref_global = np.sqrt((_ref_norms(tensors) ** 2).sum())
    assert global_norm(got).item() == pytest.approx(ref_global, rel=1e-6)


def test_worked_example():
    assert per_tensor_norms([torch.tensor([3.0, 4.0])]).tolist() == [5.0]
    assert global_norm(torch.tensor([3.0, 4.0])).item() == 5.0


def test_zeros_and_empty():
    assert per_tensor_norms([torch.zeros(4), torch.zeros(0)]).tolist() == [0.0, 0.0]
    assert per_tensor_norms([]).numel() == 0
    assert global_norm(torch.zeros(0)).item() == 0.0


def test_nan_and_inf_propagate_to_the_right_tensor():
    norms = per_tensor_norms([torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 1.0]), torch.ones(4)])
    assert math.isnan(norms[0].item())
    assert math.isinf(norms[1].item())
    assert norms[2].item() == 2.0
    assert not math.isfinite(global_norm(norms).item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4096, generator=g).to(dtype)
    got = per_tensor_norms([t])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref_norms([t.float()])[0], rel=1e-5)


def test_fp16_values_whose_square_overflows_fp16_still_give_a_finite_norm():
    t = torch.full((16,), 300.0, dtype=torch.float16)  # 300² = 9e4 > fp16 max 65504
    assert per_tensor_norms([t]).item() == pytest.approx(1200.0)


def test_mixed_dtypes_keep_input_order():
    tensors = [torch.ones(4, dtype=torch.float16), torch.ones(9), torch.ones(16, dtype=torch.bfloat16)]
    assert per_tensor_norms(tensors).tolist() == [2.0, 3.0, 4.0]


def test_update_ratios():
    got = update_ratios(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([100.0, 0.0, 4.0]))
    np.testing.assert_allclose(got.numpy(), [0.01, 0.0, 0.5], rtol=1e-6)
