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
