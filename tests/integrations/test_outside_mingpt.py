"""keel.watch in karpathy/minGPT's ``Trainer.run``, as a user adds it: the optimizer is made inside ``run()`` by
``model.configure_optimizers(config)`` (AdamW, weight decay on the matmul weights only), the model returns
``logits, loss``, the loop calls ``model.zero_grad(set_to_none=True)`` between forward and backward, clips with
``clip_grad_norm_`` and has no scheduler. keel's line goes right after ``configure_optimizers`` (plus ``import keel``).
The model is a tiny GPT of the same shape, the text Python's own source as bytes."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import keel

BLOCK, WIDTH = 16, 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, WIDTH), nn.Embedding(BLOCK, WIDTH)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f, self.lm_head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 256, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
        """minGPT's split: decay the Linear (and attention projection) weights, not biases, norms or embeddings."""
        decay = {
            n
            for n, p in self.named_parameters()
            if p.dim() >= 2 and n.endswith("weight") and "wte" not in n and "wpe" not in n
        }
        params = dict(self.named_parameters())
        groups = [
            {"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
            {"params": [params[n] for n in sorted(params.keys() - decay)], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95))


def _batches(count: int, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    text = torch.tensor(list((Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_bytes()[:20000]))
    starts = torch.randint(len(text) - BLOCK - 1, (count, batch), generator=torch.Generator().manual_seed(1))
    return [
        (torch.stack([text[i : i + BLOCK] for i in s]), torch.stack([text[i + 1 : i + BLOCK + 1] for i in s]))
        for s in starts
    ]


def run(policy: str | None, *, iters: int = 8, nan_loss_at: int = -1, lr_times_100_at: int = -1):
    """minGPT's ``Trainer.run`` loop; ``policy=None`` is the loop without keel."""
    torch.manual_seed(0)
    model = GPT()
    optimizer = model.configure_optimizers(learning_rate=3e-3, weight_decay=0.1)
    guard = keel.watch(model, optimizer, policy=policy) if policy is not None else None  # the added line
    losses = []
    for iter_num, (x, y) in enumerate(_batches(iters)):
        for group in optimizer.param_groups:  # a fault: one update at 100x the LR
            group["lr"] = 3e-3 * (100 if iter_num == lr_times_100_at else 1)
        logits, loss = model(x, y)
        if iter_num == nan_loss_at:
            loss = loss * float("nan")
        model.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    if guard is not None:
        guard.close()
    return model, losses, guard


def test_observe_is_bit_identical_to_the_bare_trainer_run():
    bare, bare_losses, _ = run(None)
    observed, observed_losses, guard = run("observe")
    assert guard is not None and not guard.findings
    assert observed_losses == bare_losses
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), observed.parameters(), strict=True))


def test_a_nan_loss_is_skipped_and_training_goes_on():
    model, losses, guard = run("skip", nan_loss_at=4)
    assert guard is not None and [(d.step, d.action) for d in guard.decisions] == [(4, "skip")]
    assert all(torch.isfinite(p).all() for p in model.parameters()) and all(x == x for x in losses[5:])


@pytest.mark.slow  # 60 steps of a small GPT
def test_one_update_at_100x_the_lr_is_named():
    # observe applies it: the loss goes 2.6 -> 5.6 and stays 5.3-5.8 for 7 steps (1.65x its level before, about 4
    # step-noise z each: no spike, under the level shift's 2x), back down by step 50. keel names the update's LR at
    # its own step (keel.detect.lr_surge: 100x the highest the run had used), and the divergence detector the rise
    # once it may judge the first 50 steps (min_history 20, was 50: no finding at all, h25 C5)
    _, losses, guard = run("observe", iters=60, lr_times_100_at=30)
    assert max(losses[31:36]) > 1.8 * losses[30]  # the update did damage the model
    assert guard is not None
    assert [(f.step, f.kind, f.severity) for f in guard.findings if f.severity != "info"] == [
        (30, "lr_surge", "critical"),
        (44, "divergence", "warning"),
    ]


@pytest.mark.slow  # 2 x 60 steps of a small GPT
def test_one_update_at_100x_the_lr_is_skipped_before_it_does_harm():
    _, clean, _ = run(None, iters=60)
    _, losses, guard = run("recover", iters=60, lr_times_100_at=30)
    assert guard is not None
    assert [(d.step, d.action) for d in guard.decisions] == [(30, "skip")]  # skipped, nothing to roll back
    assert [(f.step, f.kind, f.severity) for f in guard.findings if f.severity != "info"] == [
        (30, "lr_surge", "critical")
    ]
    # one update fewer than the bare run without the fault: the next ten losses within 5 % of it (observe: +80 %)
    assert max(abs(a - b) / b for a, b in zip(losses[31:41], clean[31:41], strict=True)) < 0.05
