"""TRL's own per-step statistics, read where TRL keeps them: the values each optimizer step added to a trainer's
``_metrics["train"]`` (name → list of floats), renamed to keel's keys.

TRL trainers (1.16) append one Python float per micro-batch and statistic to ``_metrics[mode][name]``; their
``log()`` averages each list, logs it and clears the dict (reference/rl-anchors.md §1). keel reads the values
added since its last read, before ``log()`` runs, so it records every step whatever ``logging_steps`` is, and
computes nothing TRL already computed.

Names: `keys.TRL_ALIASES` maps TRL's names onto keel's keys (``rewards/margins`` → ``pref/margin``, ``entropy``
→ ``rl/entropy``, …), which the preference and RL detectors read. Every other statistic (``num_tokens``,
``logits/chosen``, ``step_time``, the RewardTrainer's ``accuracy``/``margin``, a reward function's
``rewards/<name>/mean``, …) is kept under ``trl/<its TRL name>``: recorded and shown, but never under a name a keel
detector reads, so a TRL statistic cannot pass for a keel signal of another meaning.

Values: the mean of the step's new values (TRL's own log averages the same way). NaN stays NaN — TRL's GRPO log
drops NaN before averaging, which hides a reward function that returns NaN; keel records it. A value that is not
one real number (a list, a string, a tensor of several elements) is a problem the caller records; that statistic is
left out of the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from keel._core.keys import TRL_ALIASES

UNMAPPED_PREFIX = "trl/"  # TRL statistics without a keel key: recorded as trl/<TRL name>


def signal_key(name: str) -> str:
    """keel's key for TRL's statistic ``name``.

    Example:
        >>> signal_key("rewards/margins"), signal_key("num_tokens")
        ('pref/margin', 'trl/num_tokens')
    """
    return TRL_ALIASES.get(name, UNMAPPED_PREFIX + name)


@dataclass
class StepStatistics:
    """One step's statistics: keel key → mean of the step's new values, and the problems met reading them.

    Attributes:
        values: keel key → float (NaN and ±Inf kept).
        problems: TRL name → what is wrong with its new values (the statistic is left out of ``values``).
    """

    values: dict[str, float] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


class NewStatistics:
    """Reads, step after step, the values a TRL trainer appended to ``metrics`` (its ``_metrics["train"]``).

    TRL's ``log()`` clears the dict and the next append makes a fresh list, and some statistics are reassigned
    rather than appended (``num_tokens``): a list keel has not seen before is read from its start.

    Example:
        >>> metrics = {"rewards/margins": [0.5, 1.5]}
        >>> reader = NewStatistics(metrics)
        >>> reader.take().values
        {'pref/margin': 1.0}
        >>> metrics["rewards/margins"].append(2.0); reader.take().values
        {'pref/margin': 2.0}
        >>> metrics.clear(); metrics["rewards/margins"] = [3.0]; reader.take().values
        {'pref/margin': 3.0}
        >>> reader.take().values
        {}
    """

    def __init__(self, metrics: Mapping[str, Any]) -> None:
        self._metrics = metrics
        self._seen: dict[object, tuple[object, int]] = {}  # name → (the list read, how many of its values)

    def take(self) -> StepStatistics:
        """The values added since the last call (never raises on what the trainer stored)."""
        out = StepStatistics()
        seen: dict[object, tuple[object, int]] = {}
        for name, values in list(self._metrics.items()):
            if not isinstance(name, str) or not name:
                out.problems[repr(name)] = f"statistic name {name!r}; allowed: a non-empty str"
                continue
            if not isinstance(values, list):
                out.problems[name] = f"{_short(values)} ({type(values).__name__}); allowed: a list of numbers"
                continue
            before, count = self._seen.get(name, (None, 0))
            start = count if before is values and count <= len(values) else 0
            new = values[start:]
            seen[name] = (values, len(values))
            if not new:
                continue
            numbers = [n for n in map(_number, new) if n is not None]
            if len(numbers) < len(new):
                bad = next(v for v in new if _number(v) is None)
                out.problems[name] = f"{_short(bad)} ({type(bad).__name__}); allowed: one real number per entry"
                continue
            out.values[signal_key(name)] = sum(numbers) / len(numbers)  # as TRL's log() averages them
        self._seen = seen
        return out


def _number(value: object) -> float | None:
    """One real number as a float (a Python or NumPy real, or a one-element real tensor); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Real):
        return float(value)
    numel, item = getattr(value, "numel", None), getattr(value, "item", None)
    size = getattr(value, "size", None)
    try:
        if callable(numel) and callable(item) and numel() == 1:  # a torch tensor
            got = item()
        elif isinstance(size, int) and size == 1 and callable(item):  # a NumPy array or scalar
            got = item()
        else:
            return None
    except Exception:  # an object that only looks like a tensor
        return None
    return float(got) if isinstance(got, Real) and not isinstance(got, bool) else None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
