"""The trainers' own evaluations, as `Guard.record_eval` takes them: numbers only, the followed metric first.

`Guard.record_eval` follows the first metric of a dict (the continual metrics and the stability-gap detector read
it) with one goal per eval. A trainer says which metric it ranks checkpoints by — the HF Trainer's
``metric_for_best_model`` / ``greater_is_better``, Lightning's ``ModelCheckpoint(monitor=, mode=)`` — and that is the
one keel follows; without one, the first metric whose name holds ``loss`` (lower is better), else the first metric
(higher is better).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from keel.guard.evaluation import Goal


def eval_metrics(
    metrics: Mapping[str, Any], *, follow: str | None = None, greater_is_better: bool | None = None
) -> tuple[dict[str, float], Goal] | None:
    """The numeric metrics of ``metrics`` with the followed one first, and its goal; None when there is none.

    Args:
        metrics: Metric name → value; values that are not a real number or a one-element tensor are left out.
        follow: The metric the trainer ranks checkpoints by, if it names one.
        greater_is_better: Its direction (``None``: lower is better for a name holding ``loss``, else higher).

    Example:
        >>> eval_metrics({"accuracy": 0.9, "loss": 0.3, "note": "x"})
        ({'loss': 0.3, 'accuracy': 0.9}, 'min')
    """
    read = {str(k): _number(v) for k, v in metrics.items()}
    numbers: dict[str, float] = {k: v for k, v in read.items() if v is not None}
    if not numbers:
        return None
    if follow not in numbers:
        follow = next((k for k in numbers if "loss" in k.lower()), next(iter(numbers)))
        greater_is_better = None
    if greater_is_better is None:
        greater_is_better = "loss" not in follow.lower()
    ordered = {follow: numbers[follow], **{k: v for k, v in numbers.items() if k != follow}}
    return ordered, "max" if greater_is_better else "min"


def _number(value: object) -> float | None:
    if isinstance(value, Tensor):
        real = not (value.is_complex() or value.dtype == torch.bool)
        return float(value.detach().reshape(())) if value.numel() == 1 and real else None
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    return None
