"""Toy reproduction (Wortsman et al. 2023): at lr 0.1 the bare proxy's attention logits run away;
QK-norm + z-loss keep them bounded and the loss no worse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from keel.nn import stabilize
from keel.proxy import ProxyBatches, create_proxy_model


def _train(stabilizers: list[str], steps: int = 60, lr: float = 0.1) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    model = create_proxy_model("small")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    result = stabilize(model, stabilizers, optimizer=opt) if stabilizers else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    seen: dict[tuple[str, int], torch.Tensor] = {}
    for i, block in enumerate(model.blocks):  # the q/k slots hold the tensors that meet in q·kᵀ
        block.attn.q_norm.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("q", i), out.detach()))
        block.attn.k_norm.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("k", i), out.detach()))
    batches = ProxyBatches(batch_size=16, seq_len=64, seed=0)
    losses, max_logits = [], []
    for _ in range(steps):
        x, y = batches.next()
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        total = loss + result.z_loss() if result is not None else loss
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        max_logits.append(
            max(
                ((seen["q", i] @ seen["k", i].transpose(-1, -2)) / math.sqrt(seen["q", i].shape[-1])).abs().max().item()
                for i in range(len(model.blocks))
            )
        )
    return losses, max_logits


@pytest.mark.slow
def test_qk_norm_and_z_loss_bound_attention_logits_where_the_bare_proxy_runs_away() -> None:
    bare_losses, bare_logits = _train([])
    losses, logits = _train(["qk_norm", "z_loss"])
    assert max(bare_logits) > 1000  # runaway: softmax one-hot, attention-entropy collapse
    assert max(logits) < 100
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 <= sum(bare_losses[-10:]) / 10 + 0.05
