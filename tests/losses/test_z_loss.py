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


def _poisoned_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 3, 5) logits with a NaN row (left padding under a fully masked attention row) and an all −inf row."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) * 3
    logits[1, 0] = float("nan")
    logits[0, 2] = float("-inf")
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 0] = mask[0, 2] = False
    return logits.to(dtype), mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["z_loss", "router_z_loss"])
def test_masked_out_nan_and_minus_inf_rows_count_for_nothing(loss: str, dtype: torch.dtype) -> None:
    # Before: (squared · mask).sum() gave 0·NaN = NaN, and logsumexp's backward softmax(NaN row)·0 = NaN.
    from keel.losses import router_z_loss

    fn = {"z_loss": z_loss, "router_z_loss": router_z_loss}[loss]
    logits, mask = _poisoned_batch(dtype)
    x = logits.clone().requires_grad_()
    value = fn(x, coefficient=0.5, mask=mask)
    value.backward()
    # float64 reference: the counted rows alone, through autograd.
    counted = logits.double()[mask].clone().requires_grad_()
    expected = 0.5 * torch.logsumexp(counted, dim=-1).square().mean()
    expected.backward()
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert value.item() == pytest.approx(expected.item(), rel=rtol)
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    grad_tol = 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(x.grad[mask].double(), counted.grad, rtol=grad_tol, atol=grad_tol * 1e-2)


def test_masked_log_partition_matches_autograd_on_counted_rows_with_weights() -> None:
    from keel.losses import masked_log_partition

    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(4, 6, 9, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    weights = (torch.rand(4, 6, generator=gen, dtype=torch.float64) > 0.3) * torch.rand(4, 6, generator=gen)
    plain = logits.detach().clone().requires_grad_()
    z_loss(logits, coefficient=0.3, mask=weights).backward()
    z_loss_from_log_z(log_partition(plain), coefficient=0.3, mask=weights).backward()
    torch.testing.assert_close(logits.grad, plain.grad, rtol=1e-12, atol=1e-15)  # finite rows: the same numbers
    log_z = masked_log_partition(logits.detach(), weights != 0)
    assert torch.equal(log_z[weights == 0], torch.zeros_like(log_z[weights == 0]))
    with pytest.raises(ValueError, match="mask.shape"):
        masked_log_partition(logits, torch.ones(6, 4, dtype=torch.bool))


def test_z_loss_from_log_z_ignores_non_finite_masked_values() -> None:
    # ZLossHook.loss(mask) gets log Z recorded at forward time: its value must not be NaN either.
    log_z = torch.tensor([[1.0, float("nan")], [float("-inf"), 2.0]])
    mask = torch.tensor([[True, False], [False, True]])
    assert z_loss_from_log_z(log_z, coefficient=1.0, mask=mask).item() == pytest.approx(2.5)
