"""ZLossHook records log Z of the hooked head; its loss equals keel.losses.z_loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from keel.losses import z_loss
from keel.nn import ZLossHook


def test_loss_equals_z_loss_of_the_logits_and_has_gradient() -> None:
    torch.manual_seed(0)
    head = nn.Linear(6, 11)
    hook = ZLossHook(coefficient=0.01)
    handle = hook.attach(head)
    logits = head(torch.randn(2, 3, 6))
    torch.testing.assert_close(hook.loss(), z_loss(logits, coefficient=0.01))
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.testing.assert_close(hook.loss(mask), z_loss(logits, coefficient=0.01, mask=mask))
    hook.loss().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert not hook.last_log_z.requires_grad
    handle.remove()
    head(torch.randn(1, 6))
    assert hook.log_z.shape == (2, 3)  # detached: no longer updated


def test_errors_and_object_outputs() -> None:
    hook = ZLossHook()
    with pytest.raises(RuntimeError, match="before any forward"):
        hook.loss()
    hook(nn.Identity(), (), SimpleNamespace(logits=torch.zeros(2, 4)))
    assert hook.loss().item() == pytest.approx(1e-4 * torch.log(torch.tensor(4.0)).item() ** 2)
    with pytest.raises(TypeError, match="logits"):
        hook(nn.Identity(), (), (torch.zeros(2),))
    with pytest.raises(ValueError, match="ZLossHook.coefficient="):
        ZLossHook(-1.0)


def test_loss_rejects_a_mask_that_does_not_match_the_tokens() -> None:
    # a (3,) mask would broadcast over (2, 3) tokens and weigh the wrong ones: keel.losses.z_loss refuses it
    head = nn.Linear(4, 5)
    hook = ZLossHook()
    hook.attach(head)
    head(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"mask.shape=\(3,\); allowed: the logits' leading shape \(2, 3\)"):
        hook.loss(torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_head_records_log_z_in_float32(dtype: torch.dtype) -> None:
    hook = ZLossHook(coefficient=1.0)
    logits = (torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    hook(nn.Identity(), (), logits)
    assert hook.log_z.dtype == torch.float32
    torch.testing.assert_close(hook.loss(), z_loss(logits, coefficient=1.0), rtol=0, atol=0)


@pytest.mark.parametrize("bad_row", [float("nan"), float("-inf")])
def test_a_masked_out_nan_or_all_minus_inf_row_gets_gradient_zero(bad_row: float) -> None:
    # a fully masked attention row under left padding gives NaN logits: the mask leaves it out of the value, and
    # its gradient must be 0 too (logsumexp's backward multiplied 0 by softmax(NaN row) = NaN and poisoned the head)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logits[0, 0] = bad_row
    logits.requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    hook = ZLossHook(coefficient=0.5)
    hook(nn.Identity(), (), logits)
    hook.loss(mask).backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad[0, 0], torch.zeros(5, dtype=torch.float64))
    # the other rows' gradient is z_loss's on a clean copy of the logits (float64, independent of the hook)
    clean = logits.detach().clone()
    clean[0, 0] = 0.0
    clean.requires_grad_(True)
    z_loss(clean, coefficient=0.5, mask=mask).backward()
    torch.testing.assert_close(logits.grad[mask], clean.grad[mask], rtol=1e-12, atol=0)


def test_an_unmasked_nan_row_still_gives_a_nan_gradient() -> None:
    # the z-loss of a counted NaN row is NaN, and so is its gradient: keel's probes see it and the Guard skips
    logits = torch.zeros(2, 4, requires_grad=True)
    hook = ZLossHook()
    hook(nn.Identity(), (), logits * torch.tensor([[float("nan")], [1.0]]))
    hook.loss().backward()
    assert logits.grad is not None and torch.isnan(logits.grad[0]).all() and torch.isfinite(logits.grad[1]).all()
