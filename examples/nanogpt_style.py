"""keel on a loop written the way karpathy/nanoGPT's ``train.py`` writes it — two lines added, nothing else changed.

    python examples/nanogpt_style.py --max-iters 200 --bad-iters 60,61,62 --out runs/nanogpt

The loop below has what nanoGPT's has: a model that returns ``(logits, loss)``, gradient accumulation with
the loss divided by the accumulation steps, a GradScaler (enabled under ``--dtype float16``), the LR written
into ``param_groups`` every iteration (warm-up and cosine decay), its own ``clip_grad_norm_``, and
``scaler.step(optimizer); scaler.update()``. The lines that are keel's end in ``# keel``: ``keel.watch`` hooks
the loop's own calls (see `keel.integrations.watch`), so the update, the loss, the norm before clipping and the
LR the loop writes all reach keel without the loop knowing.

``--bad-iters`` poisons the backward of those iterations with NaN, as an fp16 overflow would: keel skips each
such update, and when they repeat past ``max_consecutive_skips`` it rolls back to a snapshot.
"""

from __future__ import annotations

import argparse
import math
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

import keel  # keel
from keel.proxy import ProxyBatches, create_proxy_model


class GPT(nn.Module):
    """nanoGPT's interface: ``logits, loss = model(idx, targets)``."""

    def __init__(self, size: str, block_size: int) -> None:
        super().__init__()
        self.transformer = create_proxy_model(size, seq_len=block_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.transformer(idx)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iters", type=int, default=200)
    parser.add_argument("--bad-iters", default="", help="comma-separated iterations whose backward turns NaN")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--policy", default="recover", choices=["observe", "skip", "recover"])
    parser.add_argument("--out", default="runs/nanogpt", help="out_dir (keel's run store goes to out_dir/keel)")
    args = parser.parse_args(argv)
    bad_iters = {int(i) for i in args.bad_iters.split(",") if i.strip()}

    # -- nanoGPT's configuration, shrunk for a CPU -----------------------------------------------------------
    out_dir, device, dtype = args.out, "cpu", args.dtype
    gradient_accumulation_steps, batch_size, block_size = 2, 8, 64
    learning_rate, min_lr, warmup_iters, lr_decay_iters = 1e-3, 1e-4, 20, args.max_iters
    weight_decay, beta1, beta2, grad_clip = 0.1, 0.9, 0.95, 1.0
    torch.manual_seed(1337)
    os.makedirs(out_dir, exist_ok=True)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device, dtype=ptdtype)

    batches = ProxyBatches(batch_size=batch_size, seq_len=block_size, seed=1337)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        return batches.next()

    def get_lr(it: int) -> float:  # nanoGPT's warm-up then cosine decay
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)

    model = GPT("tiny", block_size).to(device)
    scaler = torch.amp.GradScaler(device, enabled=(dtype == "float16"))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
        betas=(beta1, beta2),
    )
    keel_options = dict(policy=args.policy, overwrite=True, max_consecutive_skips=2)  # keel
    guard = keel.watch(model, optimizer, scaler=scaler, run_dir=f"{out_dir}/keel", **keel_options)  # keel

    # -- nanoGPT's training loop, unchanged ------------------------------------------------------------------
    X, Y = get_batch()
    iter_num = 0
    while True:
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for _micro_step in range(gradient_accumulation_steps):
            with ctx:
                logits, loss = model(X, Y)
                if iter_num in bad_iters:
                    loss = loss * float("nan")  # the fault: an overflow in this iteration's backward
                loss = loss / gradient_accumulation_steps
            X, Y = get_batch()
            scaler.scale(loss).backward()
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if iter_num % 50 == 0:
            print(f"iter {iter_num}: loss {loss.item() * gradient_accumulation_steps:.4f}")
        iter_num += 1
        if iter_num > args.max_iters:
            break

    guard.close()  # keel (optional: it also closes at exit)


if __name__ == "__main__":
    main()
