"""Gradient–weight cosine against float64, including zeros, NaN and low precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from keel.signals.grad_weight_cos import grad_weight_cosines


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64(dtype):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=g).to(dtype), torch.randn(4, generator=g).to(dtype)]
    params = [torch.randn(5, 3, generator=g).to(dtype), torch.randn(4, generator=g).to(dtype)]
    gd, wd = [t.double().numpy().ravel() for t in grads], [t.double().numpy().ravel() for t in params]
    per = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(gd, wd, strict=True)]
    total = sum(a @ b for a, b in zip(gd, wd, strict=True)) / (
        np.linalg.norm(np.concatenate(gd)) * np.linalg.norm(np.concatenate(wd))
    )
    got_total, got_per = grad_weight_cosines(grads, params)
    rtol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    assert float(got_total) == pytest.approx(total, rel=rtol)
    np.testing.assert_allclose(got_per.numpy(), per, rtol=rtol)


def test_naive_loss_minimisation_direction_zeros_and_nan():
    w = [torch.tensor([1.0, 2.0])]
    assert float(grad_weight_cosines([-3 * w[0]], w)[0]) == pytest.approx(-1.0)  # −g ∥ w: pure rescaling
    assert float(grad_weight_cosines([torch.tensor([1.0, 2.0])], [torch.zeros(2)])[1][0]) == 0.0
    assert math.isnan(float(grad_weight_cosines([torch.tensor([math.nan, 1.0])], w)[0]))


def test_complex_tensors_use_the_real_inner_product():
    # cos = Re⟨g, w⟩ / (‖g‖‖w‖); the old float() cast dropped the imaginary parts
    g = [torch.tensor([1 + 1j, 0j], dtype=torch.complex64)]
    w = [torch.tensor([0 + 1j, 0j], dtype=torch.complex64)]
    total, per = grad_weight_cosines(g, w)
    assert float(total) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert float(per[0]) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
