"""RunData: everything the report shows about one run, read from its store through `keel.store.RunReader`.

A part that cannot be read (a store from an older schema, a table a live run has not created yet) is left
empty and named in ``problems``: the page still renders with the rest. So are rows the reader left out
because a value had the wrong type (a store is untrusted input: see `keel.store.RunReader`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keel._core.decision import Decision
from keel._core.finding import Finding
from keel.report.downsample import downsample_minmax
from keel.store import RunReader, store_folder

MAX_POINTS = 100_000  # points embedded per series; longer series are min/max-downsampled to this


@dataclass(kw_only=True)
class RunData:
    """One run as the report sees it.

    Attributes:
        name: Display name (the run folder's name, made unique by the caller).
        path: The store's folder.
        meta: The run's metadata table.
        series: Signal key → (steps, values), at most `MAX_POINTS` each.
        lengths: Signal key → the number of points stored (before downsampling).
        findings: Every finding.
        decisions: Every decision that was not a plain ``ok``.
        snapshots: Disk snapshots (step, path, checksum, created).
        problems: Parts that could not be read, in words.
    """

    name: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_run(
    path: str | Path,
    *,
    name: str | None = None,
    keep=None,
    series: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> RunData:
    """Read a run store for the report.

    Args:
        path: The run folder or its ``run.sqlite``.
        name: Display name; default the folder's name.
        keep: ``keep(key) -> bool`` chooses the signals read (default: all). Per-parameter families are
            usually left out: they are hundreds of series nobody reads on a timeline.
        series: The signals, key → (steps, values) in step order, given instead of read from the store (a log's
            store is written without them: `keel.report.logs`); the rest is read from the store.

    Raises:
        FileNotFoundError: No store at ``path``.
        StoreError: The file is not an SQLite store.
    """
    path = Path(path)
    folder = store_folder(path)
    run = RunData(name=name or folder.name, path=folder)
    with RunReader(path) as reader:
        run.meta = read_part(run.problems, "metadata", reader.meta, {})

        def read_signals() -> None:
            keys = sorted(series) if series is not None else reader.signal_keys()  # the store lists them sorted
            for key in keys:
                if keep is not None and not keep(key):
                    continue
                steps, values = series[key] if series is not None else reader.signal(key)
                run.lengths[key] = len(steps)
                run.series[key] = downsample_minmax(steps, values, MAX_POINTS)

        read_part(run.problems, "signals", read_signals, None)
        run.findings = read_part(run.problems, "findings", reader.findings, [])
        run.decisions = read_part(run.problems, "decisions", reader.decisions, [])
        run.snapshots = read_part(run.problems, "snapshots", reader.snapshots, [])
        run.problems += reader.problems
    return run


def read_part(problems: list[str], what: str, read, default):  # type: ignore[no-untyped-def]
    """``read()``, or ``default`` with a line in ``problems`` when that part of a store cannot be read."""
    try:
        return read()
    except (sqlite3.Error, ValueError, KeyError, TypeError) as exc:
        problems.append(f"{what} could not be read ({type(exc).__name__}: {exc})")
        return default
