"""keel keeps neural-network training stable: watch, detect, recover, prevent, measure, report.

    guard = keel.Guard(model, optimizer, scheduler=scheduler, run_dir="runs/exp1", policy="skip")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.close()

Prevention is one call on the model you already have, before training (add ``result.z_loss()`` to the loss):

    result = keel.stabilize(model, ["qk_norm", "z_loss"], optimizer=optimizer)

Names that need torch load on first use, so ``import keel`` (and the run-store readers, the report and
``keel doctor``) work without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from keel._core import Decision, Finding, GuardClosed, KeelError, KeelWarning, Observation, TrainingAborted

__version__ = "0.1.0"

# public name → module that defines it, imported on first access
_LAZY = {
    "Guard": "keel.guard",
    "Optimizers": "keel.guard",
    "Schedulers": "keel.guard",
    "Attribution": "keel.signals.attribution",
    "SkipListSampler": "keel.data",
    "RecoveryConfig": "keel.recover",
    "RunReader": "keel.store",
    "RunWriter": "keel.store",
    "stabilize": "keel.nn",
    "list_stabilizers": "keel.nn",
    "watch": "keel.integrations.watch",
    "Watch": "keel.integrations.watch",
}

__all__ = ["Decision", "Finding", "GuardClosed", "KeelError", "KeelWarning", "Observation", "TrainingAborted", *_LAZY]


# subpackages reached as ``keel.signals.X`` after a plain ``import keel``, imported on first access
_SUBPACKAGES = {
    "catalog",
    "data",
    "detect",
    "doctor",
    "guard",
    "integrations",
    "losses",
    "nn",
    "optim",
    "proxy",
    "recover",
    "report",
    "signals",
    "store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"keel.{name}")
    raise AttributeError(f"module 'keel' has no attribute {name!r}")
