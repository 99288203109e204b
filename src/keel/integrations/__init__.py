"""Adapters for the trainers people already use; each imports its framework only when it is imported itself.

- `keel.integrations.hf.KeelCallback`: Hugging Face ``Trainer`` (``pip install 'keel[hf]'``),
- `keel.integrations.lightning.KeelCallback`: Lightning ``Trainer`` (``pip install 'keel[lightning]'``),
- `keel.integrations.trl.guard_trainer`: TRL's ``DPOTrainer``, ``GRPOTrainer`` and ``RewardTrainer``
  (``pip install 'keel[trl]'``): the Hugging Face callback fed the trainer's own loss and statistics.

They hand the trainer's optimizer and scheduler steps to the same `keel.Guard` and add no logic of their own.
"""

import importlib
from typing import Any

# each adapter is imported on first access (``keel.integrations.hf`` after a plain ``import keel``), so importing the
# package pulls in no framework
_ADAPTERS = {"hf", "lightning", "trl", "watch"}

__all__: list[str] = []


def __getattr__(name: str) -> Any:
    if name in _ADAPTERS:
        return importlib.import_module(f"keel.integrations.{name}")
    raise AttributeError(f"module 'keel.integrations' has no attribute {name!r}")
