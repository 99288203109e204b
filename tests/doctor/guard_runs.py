"""Run stores written by the real Guard for the doctor tests: a TinyNet run that skips, rolls back and takes a
post-rollback action."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tests.conftest import TinyNet, make_batches


def recovered_run(run_dir: Path, *, steps: int = 40, flip_at: int = 23) -> Path:
    """A ``recover`` run whose parameter turns NaN at ``flip_at`` (a bit flip): three skips, then a rollback to
    the snapshot of step 20 with its action (an LR back-off). Returns ``run_dir``."""
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
        if step == flip_at:
            with torch.no_grad():
                model.fc1.weight[0, 0] = float("nan")
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return run_dir
