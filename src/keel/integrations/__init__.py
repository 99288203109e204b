"""Adapters for the trainers people already use; each imports its framework only when it is imported itself.

- `keel.integrations.hf.KeelCallback`: Hugging Face ``Trainer`` (``pip install 'keel[hf]'``),
- `keel.integrations.lightning.KeelCallback`: Lightning ``Trainer`` (``pip install 'keel[lightning]'``),
- `keel.integrations.trl.guard_trainer`: TRL's ``DPOTrainer``, ``GRPOTrainer`` and ``RewardTrainer``
  (``pip install 'keel[trl]'``): the Hugging Face callback fed the trainer's own loss and statistics.

They hand the trainer's optimizer and scheduler steps to the same `keel.Guard` and add no logic of their own.
"""

__all__: list[str] = []
