"""Pseudo-Huber distance against float64, iCT's default c, and the small-difference regime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from keel.losses import pseudo_huber, pseudo_huber_c


def _reference(pred: np.ndarray, target: np.ndarray, c: float) -> np.ndarray:
    d = (pred.astype(np.float64) - target.astype(np.float64)).reshape(len(pred), -1)
    return np.sqrt((d**2).sum(1) + c * c) - c


def test_matches_float64_across_scales() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(6, 3, 4, 4, generator=gen)
    for scale in (1e-4, 1e-2, 1.0, 100.0):
        pred = target + scale * torch.randn(6, 3, 4, 4, generator=gen)
        got = pseudo_huber(pred, target, c=0.03, reduction="none")
        np.testing.assert_allclose(got.numpy(), _reference(pred.numpy(), target.numpy(), 0.03), rtol=1e-5)


def test_default_c_is_ict_value() -> None:
    assert pseudo_huber_c(3072) == pytest.approx(0.00054 * math.sqrt(3072))
    assert pseudo_huber_c(3072) == pytest.approx(0.0299, abs=1e-4)  # CIFAR-10 in the paper: c ≈ 0.03
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 3, 32, 32, generator=gen), torch.zeros(2, 3, 32, 32)
    expected = _reference(pred.numpy(), target.numpy(), pseudo_huber_c(3072)).mean()
    assert pseudo_huber(pred, target).item() == pytest.approx(expected, rel=1e-5)


def test_small_differences_do_not_cancel_to_zero() -> None:
    # ‖d‖ = 1e-5, c = 1: the textbook float32 form sqrt(1e-10 + 1) − 1 returns exactly 0.
    pred, target = torch.tensor([[1e-5]]), torch.zeros(1, 1)
    got = pseudo_huber(pred, target, c=1.0)
    assert got.item() == pytest.approx(float(_reference(pred.numpy(), target.numpy(), 1.0)[0]), rel=1e-5)
    assert (torch.sqrt(torch.tensor(1e-10) + 1) - 1).item() == 0.0


def test_gradient_is_finite_at_zero_and_bounded() -> None:
    pred = torch.zeros(3, 5, requires_grad=True)
    pseudo_huber(pred, torch.zeros(3, 5), c=0.1).backward()
    assert torch.equal(pred.grad, torch.zeros(3, 5))
    far = torch.full((1, 4), 1e6, requires_grad=True)
    pseudo_huber(far, torch.zeros(1, 4), c=0.1).backward()
    assert far.grad.norm().item() == pytest.approx(1.0, rel=1e-5)  # linear regime: unit-norm gradient


def test_reductions_bf16_nan() -> None:
    gen = torch.Generator().manual_seed(2)
    pred, target = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    each = pseudo_huber(pred, target, c=0.5, reduction="none")
    assert each.shape == (4,)
    assert pseudo_huber(pred, target, c=0.5, reduction="sum").item() == pytest.approx(each.sum().item())
    half = pseudo_huber(pred.bfloat16(), target.bfloat16(), c=0.5, reduction="none")
    assert half.dtype == torch.float32
    expected = _reference(pred.bfloat16().float().numpy(), target.bfloat16().float().numpy(), 0.5)
    np.testing.assert_allclose(half.numpy(), expected, rtol=1e-5)
    pred[0, 0] = float("nan")
    assert torch.isnan(pseudo_huber(pred, target, c=0.5, reduction="none")[0])


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="c="):
        pseudo_huber(torch.zeros(2, 2), torch.zeros(2, 2), c=0.0)
    with pytest.raises(ValueError, match="target.shape"):
        pseudo_huber(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="reduction"):
        pseudo_huber(torch.zeros(2, 2), torch.zeros(2, 2), reduction="max")
    with pytest.raises(ValueError, match="dim"):
        pseudo_huber_c(0)


def _pseudo_huber64(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    d = (pred.double() - target.double()).flatten(1)
    return torch.sqrt(d.square().sum(1) + c * c) - c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("size", "c"), [(1e20, 0.03), (3e37, 0.03), (1e-25, 1e-24)])
def test_distances_whose_square_leaves_float32_range_match_float64(dtype: torch.dtype, size: float, c: float) -> None:
    # ‖d‖² = 4e40 overflowed float32 (inf/inf = NaN); ‖d‖² = 4e-50 underflowed to 0 (distance 0).
    gen = torch.Generator().manual_seed(0)
    pred = ((torch.rand(3, 4, generator=gen) + 0.5) * size).to(dtype)
    target = torch.zeros(3, 4, dtype=dtype)
    target[2] = pred[2]  # one sample with no difference at all
    got = pseudo_huber(pred, target, c=c, reduction="none")
    torch.testing.assert_close(got.double(), _pseudo_huber64(pred, target, c), rtol=1e-6, atol=0.0)


def test_gradient_is_finite_for_zero_and_huge_differences() -> None:
    pred = torch.tensor([[0.0, 0.0], [3e20, -4e20], [0.3, 0.4]], requires_grad=True)
    target = torch.zeros(3, 2)
    pseudo_huber(pred, target, c=0.5, reduction="sum").backward()
    pred64 = pred.detach().double().requires_grad_()
    _pseudo_huber64(pred64, target, 0.5).sum().backward()
    assert pred.grad is not None
    torch.testing.assert_close(pred.grad.double(), pred64.grad, rtol=1e-6, atol=1e-12)
