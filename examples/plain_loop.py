"""keel in a plain PyTorch loop: a few lines inside the loop you already have.

    python examples/plain_loop.py --steps 200 --inject-nan 120 --out runs/plain
    keel export runs/plain --format csv          # or: --format tensorboard | wandb | mlflow | jsonl

A small MLP learns a regression task under ``policy="recover"``. ``--inject-nan STEP`` writes a NaN into one
gradient at that step, as an fp16 overflow or a bad batch would: keel skips that update and says which
parameter it came from; everything is recorded in ``--out``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import keel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--inject-nan", type=int, default=None, metavar="STEP")
    parser.add_argument("--out", default="runs/plain", help="run directory (the run store goes here)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    teacher = torch.randn(16, 1)

    # overwrite=True: each run of this example starts a new run in --out (a real job would rather pass
    # resume=True, to continue where a crash left it)
    guard = keel.Guard(
        model, optimizer, scheduler, run_dir=args.out, policy="recover", max_grad_norm=1.0, overwrite=True
    )
    for step in range(args.steps):
        x = torch.randn(32, 16)
        loss = F.mse_loss(model(x), torch.tanh(x @ teacher))
        loss.backward()
        if step == args.inject_nan:
            model[0].weight.grad[0, 0] = float("nan")
        decision = guard.step(loss)  # measure → decide → optimizer.step()/scheduler.step(), skip, or roll back
        if decision.action != "ok":
            print(f"step {step}: {decision.action} — {decision.reason}")
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    print(f"{args.steps} steps, final loss {loss.item():.4f}, run store: {args.out}/run.sqlite")


if __name__ == "__main__":
    main()
