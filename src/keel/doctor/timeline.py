"""Records → `Observation`s: column names mapped to signal keys, same-step records merged, families split.

- **Merging.** Consecutive records of the same step are one step when the columns they share hold the same
  values (a Trainer logs train and eval values as separate entries of one step, both with its ``epoch``;
  TensorBoard writes one event per tag).
- **Restarts.** A step that is not larger than the one before, or a same-step record that contradicts a
  value already logged for that step, starts a new segment: a run resumed from a checkpoint logs those
  steps again. The observations keep file order; `keel.doctor.diagnose` rewinds its detectors when it
  meets one, as the Guard does on a rollback.
- **Families.** A key ``X/name`` whose ``X`` is also a key (``grad/norm`` and ``grad/norm/fc1.weight``)
  belongs to the per-parameter family ``X/``, which detectors read from ``Observation.per_param``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from keel._core import keys
from keel._core.observation import Observation
from keel.doctor.columns import map_columns
from keel.doctor.log import RawLog

# Keys whose ``key/<x>`` companions are scalars of their own, not a family (``lr/1``: the LR of group 1).
NOT_FAMILIES = frozenset({keys.LR})


@dataclass(kw_only=True)
class Timeline:
    """A log's observations in file order, and what was done to get them.

    Attributes:
        observations: One per logged step (a restarted stretch appears again, in file order).
        columns: Signal key → the log column it was read from (mapped columns only).
        families: Per-parameter families found (``grad/norm/`` ...).
        merged: Records merged into the step before them.
    """

    observations: list[Observation] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)
    families: list[str] = field(default_factory=list)
    merged: int = 0


def build_timeline(log: RawLog) -> Timeline:
    """Map, merge and split a `RawLog`'s records into observations.

    Example:
        >>> from keel.doctor.log import RawLog
        >>> records = [(10, {"train_loss": 2.0}), (10, {"eval_loss": 2.2}), (20, {"train_loss": 1.9})]
        >>> log = RawLog(source="x", format="jsonl", records=records)
        >>> [(o.step, o.values) for o in build_timeline(log).observations]
        [(10, {'loss': 2.0, 'val/loss': 2.2}), (20, {'loss': 1.9})]
    """
    names = list(dict.fromkeys(name for _, values in log.records for name in values))
    mapping = {name: name for name in names} if log.keyed else map_columns(names)
    families = _families(mapping.values())
    family_of = {key: _family_of(key, families) for key in mapping.values()}
    timeline = Timeline(columns={key: name for name, key in mapping.items() if key != name},
                        families=sorted(families))
    merged: list[tuple[int, dict[str, float]]] = []
    for step, values in log.records:
        values = {mapping[name]: value for name, value in values.items()}
        if merged and merged[-1][0] == step and _compatible(merged[-1][1], values):
            merged[-1][1].update(values)
            timeline.merged += 1
        else:
            merged.append((step, values))
    timeline.observations = [_observation(step, values, family_of) for step, values in merged]
    return timeline


def _compatible(a: dict[str, float], b: dict[str, float]) -> bool:
    # Same step, and every column both records hold has the same value (a Trainer repeats "epoch").
    return all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a.keys() & b.keys())


def _families(names: Iterable[str]) -> set[str]:
    names = set(names)
    found = set()
    for name in names:
        head, sep, _ = name.rpartition("/")
        while sep:
            if head in names and head not in NOT_FAMILIES:
                found.add(head + "/")
            head, sep, _ = head.rpartition("/")
    return found


def _observation(step: int, values: dict[str, float], family_of: dict[str, str | None]) -> Observation:
    if not any(family_of.get(key) for key in values):
        return Observation(step=step, values=values)
    scalars: dict[str, float] = {}
    grouped: dict[str, tuple[list[str], list[float]]] = {}
    for key, value in values.items():
        family = family_of.get(key)
        if family is None:
            scalars[key] = value
        else:
            names, vals = grouped.setdefault(family, ([], []))
            names.append(key[len(family):])
            vals.append(value)
    per_param = {family: (tuple(names), vals) for family, (names, vals) in grouped.items()}
    return Observation(step=step, values=scalars, per_param=per_param)


def _family_of(key: str, families: set[str]) -> str | None:
    # The longest family that prefixes the key: grad/norm/ for grad/norm/fc1.weight.
    best = None
    for family in families:
        if key.startswith(family) and len(key) > len(family) and (best is None or len(family) > len(best)):
            best = family
    return best
