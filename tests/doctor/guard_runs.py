"""Run stores written by the real Guard for the doctor tests: a TinyNet run that skips, rolls back and takes a
post-rollback action."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tests.conftest import TinyNet, make_batches


def recovered_run(run_dir: Path, *, steps: int = 40, bad_from: int = 23) -> Path:
    """A ``recover`` run whose loss is NaN on four steps from ``bad_from`` (a stretch of bad batches): three skips,
    then a rollback to the snapshot of step 20 with its action (an LR back-off). Returns ``run_dir``."""
    from keel import Guard, RecoveryConfig

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model,
        opt,
        policy="recover",
        max_consecutive_skips=3,
        run_dir=str(run_dir),
        recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1),
    )
    for step, (x, y) in enumerate(make_batches(steps)):
        loss = F.mse_loss(model(x), y) * (float("nan") if bad_from <= step < bad_from + 4 else 1.0)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return run_dir
