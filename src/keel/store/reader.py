"""RunReader: reads a run store with the standard library and NumPy only (no torch).

Opens the file read-only, so it can read a store that a live run is still writing. A store is untrusted
input (it may come from anywhere, and SQLite columns take any type): every value's type is checked on read,
a row of the wrong type is left out and counted in `RunReader.problems`, and a file that is not a run store
raises one `StoreError`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Collection, Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from keel._core.decision import ACTIONS, Decision
from keel._core.errors import KeelWarning
from keel._core.example_ids import parse_ids
from keel._core.finding import SEVERITIES, Finding, severity_rank
from keel.store._columns import Column, StoreFile, describe, parse_json, read_meta
from keel.store.schema import (
    SCHEMA_VERSION,
    STORE_NAME,
    StoreError,
    newer_version_note,
    store_path,
    stored_version,
)
from keel.store.sweep_schema import SWEEP_STORE_NAME, sweep_given_as_run

SIGNALS = (Column("step", "int"), Column("value", "real", nullable=True))
SIGNAL_ROWS = (Column("step", "int"), Column("key", "text"), Column("value", "real", nullable=True))
MAX_SQL_VARIABLES = 999  # the fewest ``?`` one statement takes (SQLite before 3.32); more keys are chosen in Python
FINDINGS = (
    Column("step", "int"),
    Column("kind", "text"),
    Column("severity", "text"),
    Column("signal", "text"),
    Column("value", "real", nullable=True),
    Column("baseline", "real", nullable=True),
    Column("evidence", "text"),
    Column("cause", "text"),
    Column("advice", "text"),
)
# Stores written before keel called it advice hold the same text in a ``remedy`` column, and the ranked list in
# the evidence under ``remedies``; they are read as today's (`RunReader.findings`).
LEGACY_ADVICE, LEGACY_RANKED_ADVICE = "remedy", "remedies"
DECISIONS = (
    Column("step", "int"),
    Column("action", "text"),
    Column("reason", "text"),
    Column("actor", "text"),
    Column("onset", "int", nullable=True),
    Column("restored_step", "int", nullable=True),
)
BATCHES = (Column("step", "int"), Column("ids", "text"))
MAX_BATCH_IDS = 10_000_000  # ids `RunReader.batches` reads in all (~400 MB as Python ints)
SNAPSHOTS = (Column("step", "int"), Column("path", "text"), Column("checksum", "text"), Column("created", "real"))


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


class RunReader:
    """The read side of a run store.

    Args:
        run: A run directory or the path of its ``run.sqlite``.

    Attributes:
        problems: Rows left out because a value had the wrong type (a table, a count, the first reason), one
            line per table; empty for a store keel wrote.

    Raises:
        FileNotFoundError: No store at that path.
        StoreError: The file is not SQLite, or ``run`` is a sweep (its folder or its sweep.sqlite); a method raises
            it when its table or a required column is missing.

    Warns:
        KeelWarning: A newer keel wrote the store; it is read as far as this keel knows its tables.
    """

    def __init__(self, run: str | Path) -> None:
        self.path = store_path(run)
        sweep = None if self.path.is_file() and self.path.name != SWEEP_STORE_NAME else sweep_given_as_run(Path(run))
        if sweep is not None:
            raise StoreError(sweep)
        self._file = StoreFile(self.path, "run store")
        version = stored_version(self._file.conn)
        if version > SCHEMA_VERSION:
            note = newer_version_note(self.path, version)
            warnings.warn(f"{note}: read as far as this keel knows its tables", KeelWarning, stacklevel=2)

    @property
    def problems(self) -> list[str]:
        return self._file.problems

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self) -> dict[str, Any]:
        """The metadata table; an entry whose value is not JSON is left out and counted."""
        return read_meta(self._file)

    def signal_keys(self) -> list[str]:
        keys = []
        for key in self._file.distinct("signals", "key"):
            if isinstance(key, str):
                keys.append(key)
            else:  # a key that is not text: its rows are left out
                count = self._file.conn.execute("SELECT count(*) FROM signals WHERE key IS ?", (key,)).fetchone()[0]
                self._file.drop("signals", f"key is {describe(key)}; allowed: text", count)
        return keys

    def signal(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one signal in step order; NaN where a value was NaN."""
        data = self._file.rows("signals", SIGNALS, where="key = ?", params=(key,), order="step, rowid")
        steps = np.fromiter(map(itemgetter(0), data), dtype=np.int64, count=len(data))
        values = np.array(list(map(itemgetter(1), data)), dtype=np.float64).reshape(-1)  # NULL (a NaN) → nan
        return steps, values

    def signal_rows(self, keys: Collection[str] | None = None) -> Iterator[tuple[int, dict[str, float]]]:
        """``(step, {key: value})`` per step that logged any of ``keys`` (default: all), in step order, read as
        they come: memory stays that of one step, however long the run.

        A step's values are in key order (`signal_keys`'), NaN where a value was NaN; a key logged twice at one
        step (a resumed run re-logs the steps after its snapshot) keeps the later value. The same values as
        `signal` of each key.

        Raises:
            StoreError: The store has no signals table (when the first row is asked for).
        """
        if keys is not None and not keys:
            return
        params: tuple[str, ...] = () if keys is None or len(keys) > MAX_SQL_VARIABLES else tuple(keys)
        where = f"key IN ({', '.join('?' * len(params))})" if params else "1"
        data = self._file.stream("signals", SIGNAL_ROWS, where=where, params=params, order="step, key, rowid")
        if keys is not None and not params:
            wanted = frozenset(keys)
            data = (row for row in data if row[1] in wanted)
        for step, group in itertools.groupby(data, itemgetter(0)):
            yield step, {key: math.nan if value is None else float(value) for _, key, value in group}

    def step_span(self, keys: Collection[str]) -> tuple[int, int] | None:
        """The first and the last step at which any of ``keys`` was logged (None when none was), each from the
        ``(key, step)`` index: a look-up per key, not a pass over the table (for a progress bar's length)."""
        ends = []
        for key in keys:
            for end in ("min", "max"):
                found = self._file.conn.execute(f"SELECT {end}(step) FROM signals WHERE key = ?", (key,)).fetchone()
                if isinstance(found[0], int):
                    ends.append(found[0])
        return (min(ends), max(ends)) if ends else None

    def findings(self, min_severity: str | None = None) -> list[Finding]:
        found = []
        present = self._file.columns("findings")
        legacy = LEGACY_ADVICE in present and "advice" not in present
        columns = (*FINDINGS[:-1], Column(LEGACY_ADVICE, "text")) if legacy else FINDINGS
        for step, kind, severity, signal, value, baseline, evidence, cause, advice in self._file.rows(
            "findings", columns, order="step, rowid"
        ):
            try:
                facts = parse_json(evidence)
            except ValueError as exc:
                self._file.drop("findings", f"evidence is not JSON ({exc})")
                continue
            if not isinstance(facts, dict) or severity not in SEVERITIES:
                reason = (
                    f"evidence is {describe(facts)}, not a JSON object"
                    if not isinstance(facts, dict)
                    else f"severity is {describe(severity)}; allowed: {', '.join(SEVERITIES)}"
                )
                self._file.drop("findings", reason)
                continue
            if legacy and LEGACY_RANKED_ADVICE in facts and "advice" not in facts:  # renamed where it stands
                facts = {("advice" if k == LEGACY_RANKED_ADVICE else k): v for k, v in facts.items()}
            found.append(
                Finding(
                    step=step,
                    kind=kind,
                    severity=severity,
                    signal=signal,
                    value=_float(value),
                    baseline=_float(baseline),
                    evidence=facts,
                    cause=cause,
                    advice=advice,
                )
            )
        if min_severity is None:
            return found
        floor = severity_rank(min_severity)
        return [f for f in found if severity_rank(f.severity) >= floor]

    def decisions(self) -> list[Decision]:
        out = []
        for step, action, reason, actor, onset, restored in self._file.rows(
            "decisions", DECISIONS, order="step, rowid"
        ):
            if action not in ACTIONS:
                self._file.drop("decisions", f"action is {describe(action)}; allowed: {', '.join(ACTIONS)}")
                continue
            out.append(Decision(step=step, action=action, reason=reason, by=actor, onset=onset, restored_step=restored))
        return out

    def batches(self, steps: range | None = None) -> dict[int, list[int]]:
        """The example ids of each step's batch, by step (steps whose loop gave ``batch_ids``; only those in
        ``steps`` when given); a store written before keel kept them, or by a loop that gave none, has none. Rows
        whose ids do not parse, or past `MAX_BATCH_IDS` ids in all (a crafted store must not exhaust memory), are
        left out and counted."""
        if "ids" not in self._file.columns("batches"):
            return {}
        out: dict[int, list[int]] = {}
        budget = MAX_BATCH_IDS
        span = "1" if steps is None else "step >= ? AND step < ?"
        params = () if steps is None else (steps.start, steps.stop)
        for step, text in self._file.rows("batches", BATCHES, where=span, params=params, order="step, rowid"):
            try:
                ids = parse_ids(text, limit=budget)
            except ValueError as exc:
                self._file.drop("batches", str(exc))
                continue
            budget -= len(ids)
            out[step] = ids
        return out

    def snapshots(self) -> list[dict[str, Any]]:
        return [
            dict(step=s, path=p, checksum=c, created=float(t))
            for s, p, c, t in self._file.rows("snapshots", SNAPSHOTS, order="step, rowid")
        ]


def find_runs(folder: str | Path, *, depth: int = 2) -> list[Path]:
    """The run folders (holding a ``run.sqlite``) up to ``depth`` levels below ``folder``, in path order.

    ``runs/exp1`` and ``runs/A/keel`` under ``runs``. A run folder is not searched further (it holds its own
    snapshots and exports, not other runs), nor are hidden folders; a folder that cannot be listed is passed
    over. ``folder`` itself is not included.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for run in ("A/keel", "B/keel", "solo"):
        ...     (root / run).mkdir(parents=True)
        ...     (root / run / STORE_NAME).touch()
        >>> [str(p.relative_to(root)) for p in find_runs(root)]
        ['A/keel', 'B/keel', 'solo']
    """
    found: list[Path] = []
    level = [Path(folder)]
    for _ in range(depth):
        below: list[Path] = []
        for parent in level:
            try:
                children = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:  # no permission, vanished meanwhile: nothing found there
                continue
            for child in children:
                (found if (child / STORE_NAME).is_file() else below).append(child)
        level = below
    return sorted(found)


__all__ = ["RunReader", "find_runs"]
