"""z-loss against a float64 NumPy re-derivation, its analytic gradient, and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keel.losses import log_partition, z_loss, z_loss_from_log_z


def _reference(logits: np.ndarray, coefficient: float, mask: np.ndarray | None = None) -> float:
    x = logits.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x - peak).sum(axis=-1)) + peak[..., 0]
    if mask is None:
        return coefficient * float(np.mean(log_z**2))
    return coefficient * float((log_z**2 * mask).sum() / max(mask.sum(), 1))


def test_matches_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 50, generator=gen) * 8 + 3
    expected = _reference(logits.numpy(), 1e-4)
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    assert z_loss(logits, coefficient=0.5).item() == pytest.approx(expected / 1e-4 * 0.5, rel=1e-5)


def test_default_coefficient_is_1e_4() -> None:
    logits = torch.zeros(3, 8)  # log Z = log 8
    assert z_loss(logits).item() == pytest.approx(1e-4 * np.log(8) ** 2, rel=1e-6)


def test_mask_selects_tokens_and_all_false_gives_zero() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=gen) * 4
    mask = torch.rand(2, 5, generator=gen) > 0.4
    expected = _reference(logits.numpy(), 1e-4, mask.numpy())
    assert z_loss(logits, mask=mask).item() == pytest.approx(expected, rel=1e-5)
    assert z_loss(logits, mask=torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="mask.shape"):
        z_loss(logits, mask=torch.ones(5, 2, dtype=torch.bool))


def test_gradient_is_two_coefficient_log_z_softmax_over_tokens() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 9, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    z_loss(logits, coefficient=0.1).backward()
    x = logits.detach().numpy()
    log_z = np.log(np.exp(x).sum(-1, keepdims=True))
    expected = 2 * 0.1 * log_z * np.exp(x - log_z) / x.shape[0]
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-12)


def test_bf16_logits_are_reduced_in_float32() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(8, 1000, generator=gen) * 5).bfloat16()
    log_z = log_partition(logits)
    assert log_z.dtype == torch.float32
    expected = _reference(logits.float().numpy(), 1e-4)
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_edge_cases_nan_inf_empty() -> None:
    masked_vocab = torch.tensor([[0.0, float("-inf"), 0.0]])  # -inf entries are ignored exactly
    assert z_loss(masked_vocab, coefficient=1.0).item() == pytest.approx(np.log(2) ** 2, rel=1e-6)
    assert torch.isnan(z_loss(torch.tensor([[0.0, float("nan")]])))
    assert torch.isinf(z_loss(torch.tensor([[0.0, float("inf")]])))
    assert z_loss(torch.zeros(0, 5)).item() == 0.0
    assert z_loss_from_log_z(torch.zeros(0)).item() == 0.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_rejects_bad_coefficient(bad: float) -> None:
    with pytest.raises(ValueError, match="coefficient"):
        z_loss(torch.zeros(1, 2), coefficient=bad)


@pytest.mark.parametrize("bad", ["1e-4", None, [1e-4]])
def test_a_coefficient_that_is_no_number_is_one_clear_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"coefficient=.*; allowed: a finite number >= 0"):
        z_loss(torch.zeros(1, 2), coefficient=bad)  # type: ignore[arg-type]
