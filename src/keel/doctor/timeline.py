"""Records → observations: column names mapped to signal keys, same-step records merged, families split.

- **Merging.** Consecutive records of the same step are one step when the columns they share hold the same
  values (a Trainer logs train and eval values as separate entries of one step, both with its ``epoch``;
  TensorBoard writes one event per tag).
- **Restarts.** A step that is not larger than the one before, or a same-step record that contradicts a
  value already logged for that step, starts a new segment: a run resumed from a checkpoint logs those
  steps again. The observations keep file order; `keel.doctor.examine` rewinds its detectors when it
  meets one, as the Guard does on a rollback.
- **Families.** A key ``X/name`` whose ``X`` is also a key (``grad/norm`` and ``grad/norm/fc1.weight``)
  belongs to the per-parameter family ``X/``, which detectors read from ``Observation.per_param``; its
  members are listed in the order the log first names them.

The timeline is columnar, like the `LogTable` it is built from: one step per observation and, per signal, the
observations that logged it. `Timeline.iter_observations` makes the `Observation` objects the detectors read
one block at a time, so a million-step log never holds a million of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from keel._core import keys
from keel._core.observation import Observation
from keel.doctor.columns import map_columns
from keel.doctor.log import RawLog
from keel.doctor.table import Column, LogTable

# Keys whose ``key/<x>`` companions are scalars of their own, not a family (``lr/1``: the LR of group 1).
NOT_FAMILIES = frozenset({keys.LR})
_BLOCK = 4096  # observations made at a time


@dataclass(kw_only=True)
class Timeline:
    """A log's observations in file order, and what was done to get them.

    Attributes:
        steps: The step of each observation (int64; a restarted stretch appears again, in file order).
        signals: Scalar signal key → the observations that logged it (`Column.rows` are observation numbers).
        members: Family (``grad/norm/``) → its members' names (``fc1.weight``) and observations, in order.
        columns: Signal key → the log column it was read from (mapped columns only).
        families: Per-parameter families found (``grad/norm/`` ...).
        merged: Records merged into the step before them.
        orders: For a step merged from several records, its keys in the order they were first logged there
            (a family's members are listed in that order, not the log's; only kept when the log has families).
    """

    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    signals: dict[str, Column] = field(default_factory=dict)
    members: dict[str, list[tuple[str, Column]]] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    families: list[str] = field(default_factory=list)
    merged: int = 0
    orders: dict[int, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def observations(self) -> list[Observation]:
        """Every observation as an object (for small logs; `iter_observations` makes them a block at a time)."""
        return list(self.iter_observations())

    def observation(self, index: int) -> Observation:
        """Observation ``index`` alone."""
        return next(self.iter_observations(index, index + 1))

    def iter_observations(self, start: int = 0, stop: int | None = None) -> Iterator[Observation]:
        """The observations ``start`` to ``stop`` (default: to the end), in order."""
        stop = len(self) if stop is None else min(stop, len(self))
        for lo in range(start, stop, _BLOCK):
            hi = min(lo + _BLOCK, stop)
            keys, columns, gapped, extra, grouped = self._block(lo, hi)
            rows = zip(*columns, strict=True) if columns else repeat(())
            # The hot loop of `keel doctor` on a long log: one pass per logged step, nothing it can skip.
            for i, step, row in zip(range(lo, hi), self.steps[lo:hi].tolist(), rows, strict=False):
                values = dict(zip(keys, row, strict=False))
                for key in gapped:
                    if values[key] is None:
                        del values[key]
                if extra and i in extra:
                    values.update(extra[i])
                if grouped and i in grouped:
                    families = grouped[i]
                    if i in self.orders:
                        _reorder(families, self.orders[i])
                    per_param = {f: (tuple(names), vals) for f, (names, vals) in families.items()}
                    yield Observation(step=step, values=values, per_param=per_param)
                else:
                    yield Observation(step=step, values=values)

    def _block(
        self, lo: int, hi: int
    ) -> tuple[
        list[str],
        list[list[Any]],
        list[str],
        dict[int, dict[str, float]],
        dict[int, dict[str, tuple[list[str], list[float]]]],
    ]:
        """What observations [lo, hi) hold: the scalars logged at most of them as lists (None where not
        logged; ``gapped`` names those with a None), the scalars logged at few of them by observation, and
        the per-parameter families by observation."""
        size = hi - lo
        keys: list[str] = []
        columns: list[list[Any]] = []
        gapped: list[str] = []
        extra: dict[int, dict[str, float]] = {}
        for key, col in self.signals.items():
            a, b = np.searchsorted(col.rows, (lo, hi)).tolist()
            if b - a == size:
                keys.append(key)
                columns.append(col.values[a:b].tolist())
            elif (b - a) * 8 >= size:
                keys.append(key)
                columns.append(_spread(col, a, b, lo, size))
                gapped.append(key)
            else:
                for i, value in zip(col.rows[a:b].tolist(), col.values[a:b].tolist(), strict=True):
                    extra.setdefault(i, {})[key] = value
        grouped: dict[int, dict[str, tuple[list[str], list[float]]]] = {}
        for family, members in self.members.items():
            for name, col in members:
                a, b = np.searchsorted(col.rows, (lo, hi)).tolist()
                for i, value in zip(col.rows[a:b].tolist(), col.values[a:b].tolist(), strict=True):
                    names, values = grouped.setdefault(i, {}).setdefault(family, ([], []))
                    names.append(name)
                    values.append(value)
        return keys, columns, gapped, extra, grouped


def _reorder(families: dict[str, tuple[list[str], list[float]]], order: list[str]) -> None:
    """Each family's members put in ``order`` (keys), in place."""
    rank = {key: i for i, key in enumerate(order)}
    for family, (names, values) in families.items():
        pairs = sorted(zip(names, values, strict=True), key=lambda nv: rank[family + nv[0]])
        names[:] = [n for n, _ in pairs]
        values[:] = [v for _, v in pairs]


def _spread(col: Column, a: int, b: int, lo: int, size: int) -> list[float | None]:
    """The values of ``col.rows[a:b]`` at their places in a list of ``size`` starting at observation ``lo``."""
    spread = np.full(size, None, dtype=object)
    spread[col.rows[a:b] - lo] = col.values[a:b].tolist()
    return spread.tolist()


def build_timeline(log: RawLog) -> Timeline:
    """Map, merge and split a `RawLog`'s records into observations.

    Example:
        >>> from keel.doctor.log import RawLog
        >>> records = [(10, {"train_loss": 2.0}), (10, {"eval_loss": 2.2}), (20, {"train_loss": 1.9})]
        >>> log = RawLog(source="x", format="jsonl", records=records)
        >>> [(o.step, o.values) for o in build_timeline(log).observations]
        [(10, {'loss': 2.0, 'val/loss': 2.2}), (20, {'loss': 1.9})]
    """
    table = log.records
    # A column no record logged is no column; the others in the order the log first names them (an alias
    # goes to the first of two spellings, as it did when records were read one by one).
    logged = [(int(col.rows[0]), i, name) for i, (name, col) in enumerate(table.columns.items()) if len(col.rows)]
    names = [name for _, _, name in sorted(logged)]
    mapping = {name: name for name in names} if log.keyed else map_columns(names)
    families = _families(mapping.values())
    starts, merged, orders = _merge(table, mapping)
    timeline = Timeline(
        steps=table.steps if merged == 0 else table.steps[starts],
        columns={key: name for name, key in mapping.items() if key != name},
        families=sorted(families),
        merged=merged,
    )
    observation_of = None if merged == 0 else np.cumsum(starts) - 1
    if observation_of is not None and families:
        timeline.orders = {int(observation_of[row]): order for row, order in orders.items()}
    for name in names:
        key, col = mapping[name], table.columns[name]
        if observation_of is not None:
            col = _last_per_observation(observation_of[col.rows], col.values)
        family = _family_of(key, families)
        if family is None:
            previous = timeline.signals.get(key)
            timeline.signals[key] = col if previous is None else _combine(previous, col)
        else:
            timeline.members.setdefault(family, []).append((key[len(family) :], col))
    return timeline


UNIT_LOSS_SCALE = (
    "loss scale is 1.0 at every logged step (bf16 or fp32: no loss scaling): left out, so a NaN is not read as a "
    "loss scaler's overflow"
)


def drop_unit_loss_scale(timeline: Timeline) -> bool:
    """Leave out a loss scale that is 1.0 wherever logged, and say whether one was. Megatron prints ``loss scale:
    1.0`` under bf16 too, where nothing scales the loss, and a logged scale tells the detectors that a GradScaler-like
    scaler skips the non-finite steps (``loss_scale_overflow``, info) — so a bf16 run's NaN loss would read as one."""
    scale = timeline.signals.get(keys.AMP_SCALE)
    if scale is None or not len(scale.values) or not bool(np.all(np.asarray(scale.values) == 1.0)):
        return False
    del timeline.signals[keys.AMP_SCALE]
    timeline.columns.pop(keys.AMP_SCALE, None)
    return True


def _merge(table: LogTable, mapping: dict[str, str]) -> tuple[np.ndarray, int, dict[int, list[str]]]:
    """Which records start an observation, how many were merged into the one before them, and the order in
    which a merged step's keys were first logged (by the record that starts it)."""
    steps = table.steps
    starts = np.ones(len(steps), dtype=bool)
    repeats = np.flatnonzero(steps[1:] == steps[:-1]) + 1  # records with the step of the record before
    if not len(repeats):
        return starts, 0, {}
    involved = np.union1d(repeats - 1, repeats)
    records = _records_at(table, involved, mapping)
    repeated = set(repeats.tolist())
    merged = 0
    group: dict[str, float] = {}
    first = -1
    orders: dict[int, list[str]] = {}
    for row in involved.tolist():
        values = records[row]
        if row in repeated and _compatible(group, values):
            group.update(values)
            starts[row] = False
            merged += 1
            orders[first] = list(group)
        else:
            group, first = dict(values), row
    return starts, merged, orders


def _records_at(table: LogTable, rows: np.ndarray, mapping: dict[str, str]) -> dict[int, dict[str, float]]:
    """The records at ``rows`` (sorted), by signal key."""
    out: dict[int, dict[str, float]] = {row: {} for row in rows.tolist()}
    for name, key in mapping.items():
        col = table.columns[name]
        at = np.minimum(np.searchsorted(col.rows, rows), len(col.rows) - 1)
        hit = col.rows[at] == rows
        for row, value in zip(rows[hit].tolist(), col.values[at[hit]].tolist(), strict=True):
            out[row][key] = value
    return out


def _compatible(a: dict[str, float], b: dict[str, float]) -> bool:
    # Same step, and every column both records hold has the same value (a Trainer repeats "epoch").
    return all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a.keys() & b.keys())


def _last_per_observation(observations: np.ndarray, values: np.ndarray) -> Column:
    """One value per observation, the last record's (merged records update the step they join)."""
    last = np.ones(len(observations), dtype=bool)
    last[:-1] = observations[1:] != observations[:-1]
    return Column(rows=observations[last], values=values[last])


def _combine(first: Column, later: Column) -> Column:
    # Two columns mapped to one key: the later column's value wins where both logged a step.
    rows = np.concatenate([first.rows, later.rows])
    order = np.argsort(rows, kind="stable")
    return _last_per_observation(rows[order], np.concatenate([first.values, later.values])[order])


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


def _family_of(key: str, families: set[str]) -> str | None:
    # The longest family that prefixes the key: grad/norm/ for grad/norm/fc1.weight.
    best = None
    for family in families:
        if key.startswith(family) and len(key) > len(family) and (best is None or len(family) > len(best)):
            best = family
    return best
