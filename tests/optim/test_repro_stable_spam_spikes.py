"""Toy reproduction (Huang et al. 2025): three gradient spikes of 1000× pointing uphill make AdamW's loss
jump by several nats for tens of steps; Stable-SPAM's AdaClip + AdaGN keep the gradient Adam sees at its
usual norm and the loss barely moves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel.optim import StableSPAM
from keel.proxy import ProxyBatches, create_proxy_model

SPIKES = (50, 51, 52)


def _losses(make_optimizer, spikes: tuple[int, ...], steps: int = 90) -> list[float]:
    torch.manual_seed(0)
    model = create_proxy_model("tiny")
    opt = make_optimizer(model.parameters())
    batches = ProxyBatches(batch_size=16, seq_len=64, seed=0)
    losses = []
    for step in range(steps):
        x, y = batches.next()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        if step in spikes:  # a corrupted batch: 1000× the usual gradient, pointing uphill
            for p in model.parameters():
                p.grad.mul_(-1000.0)
        opt.step()
        losses.append(loss.item())
    return losses


def _damage(make_optimizer) -> tuple[float, float]:
    clean, spiked = _losses(make_optimizer, ()), _losses(make_optimizer, SPIKES)
    after = [s - c for s, c in zip(spiked[53:83], clean[53:83], strict=True)]
    return sum(after) / len(after), max(after)


@pytest.mark.slow
def test_stable_spam_absorbs_spikes_that_derail_adamw() -> None:
    adamw_mean, adamw_max = _damage(lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.0))
    stable_mean, stable_max = _damage(lambda ps: StableSPAM(ps, lr=3e-3))
    assert adamw_mean > 1.0  # the loss jumps by more than a nat for 30 steps
    assert stable_mean < 0.4 and stable_max < 0.6
    assert adamw_max > 3 * stable_max
