import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.signals.norms import (
    ONE_BY_ONE_MEAN_NUMEL,
    finiteness_witness,
    global_norm,
    one_by_one,
    per_tensor_norms,
    update_ratios,
)


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


# --- CPU float32 tensors large on average: one dot product (norms) or one sum (element_total) per tensor ---------
LARGE = ONE_BY_ONE_MEAN_NUMEL


def _large_tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LARGE * 2, generator=g) * 1e3, torch.randn(64, generator=g), torch.randn(LARGE, 3, generator=g)]


def test_large_cpu_float32_tensors_are_normed_one_by_one_and_match_the_float64_reference():
    tensors = _large_tensors()
    assert one_by_one(tensors)
    got = per_tensor_norms(tensors)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _ref_norms(tensors), rtol=1e-6)
    foreach = torch.stack(torch._foreach_norm(tensors, 2))
    np.testing.assert_allclose(got.numpy(), foreach.numpy(), rtol=1e-5)


def test_the_one_by_one_path_is_not_taken_for_small_non_contiguous_or_low_precision_tensors():
    tensors = _large_tensors()
    assert not one_by_one([torch.ones(8), torch.ones(8)])
    assert not one_by_one([tensors[2].t(), tensors[0]])  # a transposed view: no flat view to dot
    assert not one_by_one([t.to(torch.bfloat16) for t in tensors])
    transposed = [tensors[2].t().contiguous().t()]  # non-contiguous, large: the foreach path, same values
    np.testing.assert_allclose(per_tensor_norms(transposed).numpy(), _ref_norms(transposed), rtol=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_by_one_norms_propagate_nan_and_inf_to_the_right_tensor(bad):
    tensors = _large_tensors()
    tensors[2][5, 1] = bad
    norms = per_tensor_norms(tensors)
    assert math.isfinite(norms[0].item()) and math.isfinite(norms[1].item())
    assert (math.isnan if math.isnan(bad) else math.isinf)(norms[2].item())


def test_one_by_one_empty_and_zero_tensors():
    assert per_tensor_norms([torch.zeros(LARGE * 3), torch.zeros(0)]).tolist() == [0.0, 0.0]


def test_finiteness_witness_of_finite_and_empty_inputs_is_finite():
    assert math.isfinite(finiteness_witness([torch.tensor([1.0, -3.0]), torch.ones(2)]).item())
    assert finiteness_witness([]).item() == 0.0
    big = [torch.full((LARGE,), 0.5), torch.full((LARGE,), -0.25)]
    assert one_by_one(big)
    assert finiteness_witness(big).item() == LARGE * 0.25  # the sum of sums, there


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("large", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_finiteness_witness_is_not_finite_when_any_element_is(bad, large, dtype):
    tensors = [t.to(dtype) for t in (_large_tensors() if large else [torch.randn(5), torch.randn(3, 2)])]
    assert math.isfinite(finiteness_witness(tensors).item())
    tensors[-1].view(-1)[-1] = bad
    assert not math.isfinite(finiteness_witness(tensors).item())


def test_a_witness_of_finite_values_past_float32_range_is_not_finite_so_the_caller_checks_exactly():
    tensors = [torch.full((LARGE,), 3e34)]  # each finite; their sum is past float32's 3.4e38
    assert not math.isfinite(finiteness_witness(tensors).item())
    assert bool(torch.isfinite(tensors[0]).all())


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3 * LARGE), min_size=1, max_size=6),
    scale=st.sampled_from([1e-15, 1e-3, 1.0, 1e6, 1e15]),  # squares within float32's normal range
    seed=st.integers(0, 2**16),
)
def test_per_tensor_norms_agree_with_the_foreach_kernel_and_float64_on_any_sizes(sizes, scale, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=g) * scale for n in sizes]
    got = per_tensor_norms(tensors).numpy()
    np.testing.assert_allclose(got, _ref_norms(tensors), rtol=1e-5)
    assert math.isfinite(finiteness_witness(tensors).item())
