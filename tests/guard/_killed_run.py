"""A small training loop under keel, run as a child process by the tests of a run that ends badly.

Usage: ``python -m tests.guard._killed_run RUN_DIR STEPS HOW [resume] [no_handlers]``. It prints ``step N`` after
each step (flushed), so the parent knows where the loop is when it sends a signal. ``HOW`` is how the loop ends:
``close`` (guard.close() after the loop), ``with`` (the Guard as a context manager), ``raise`` (a RuntimeError
out of the loop at the last step, no close), ``exit`` (sys.exit(3) at the last step, no close), ``wait`` (after
the last step, sleep until killed). A step takes ~10 ms of sleep so a signal lands between or inside steps.
"""

from __future__ import annotations

import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from keel import Guard, RecoveryConfig


def main(argv: list[str]) -> None:
    run_dir, steps, how = argv[0], int(argv[1]), argv[2]
    resume, plain = "resume" in argv[3:], "no_handlers" in argv[3:]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell may have handed us SIG_IGN
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    extra = {"flush_on_exit": False} if plain else {}
    guard = Guard(
        model,
        opt,
        run_dir=run_dir,
        policy="recover",
        recovery=RecoveryConfig(snapshot_every=5, disk_every=2),
        resume=resume,
        **extra,
    )
    g = torch.Generator().manual_seed(1)

    def loop() -> None:
        while guard.global_step < steps:
            x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
            time.sleep(0.01)
            print(f"step {guard.global_step - 1}", flush=True)
            if guard.global_step == steps and how == "raise":
                raise RuntimeError("the loop failed")
            if guard.global_step == steps and how == "exit":
                sys.exit(3)
        if how == "wait":
            time.sleep(60)

    if how == "with":
        with guard:
            loop()
    else:
        loop()
        guard.close()


if __name__ == "__main__":
    main(sys.argv[1:])
