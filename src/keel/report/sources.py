"""What the report can read, and the extension point for what it cannot: one `StoreKind` per store schema.

A path given to `keel report` is classified by the tables of its SQLite file. The report reads run stores
(``meta``, ``signals``, and ``findings``, ``decisions``, ``snapshots``) and sweep stores
(``sweep_dir/sweep.sqlite``: ``meta``, ``runs``) itself, through the store layer's readers, which check every
value they read: a store is untrusted input, never markup. An SQLite store of a kind the report does not know is
skipped with a note; a path that holds no store at all (a typo, an empty folder, a text file) is an error for
the caller to raise. A new store kind: add a `StoreKind` here, a reader in `keel.store`, and its section.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keel.doctor import formats
from keel.doctor.mlflow_log import is_mlflow_db
from keel.store import STORE_NAME, STORE_SUFFIX, SWEEP_STORE_NAME, find_runs
from keel.store.schema import connect_for_reading


@dataclass(frozen=True, kw_only=True)
class StoreKind:
    """A store schema the report understands: its name and the tables that identify it."""

    name: str
    tables: frozenset[str]


STORE_KINDS: list[StoreKind] = [
    # A run store is known by its signals; a missing findings, decisions or snapshots table is a note on the page.
    StoreKind(name="run", tables=frozenset({"meta", "signals"})),
    StoreKind(name="sweep", tables=frozenset({"meta", "runs"})),
]


@dataclass(frozen=True, kw_only=True)
class Source:
    """One path given to the report, classified: ``kind`` is a `StoreKind` name, or None with a ``note``.

    ``store`` is False when the path holds no SQLite store at all (the note says what is there instead).
    ``log`` is the training log a run store was written from (`keel.report.logs`), shown in its place; ``series``
    its signals, given in memory (that store is written without them).
    """

    path: Path
    kind: str | None
    note: str = ""
    store: bool = True
    log: Path | None = None
    series: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None


def expand(paths: list[str | Path]) -> list[Path]:
    """Each path as given, except that a folder without a store stands for the run stores one or two levels
    below it (``keel report runs/demo`` → ``runs/demo/bare``, ``runs/demo/guarded`` …; ``runs`` →
    ``runs/A/keel``, ``runs/B/keel``), in path order (`keel.store.find_runs`), or, holding none, for its
    TensorBoard runs (`keel.doctor.formats.tensorboard_runs`: ``lightning_logs/version_0``, ``version_1`` …)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not (path / STORE_NAME).is_file() and not (path / SWEEP_STORE_NAME).is_file():
            # keel runs one or two levels down; else several W&B, MLflow or TensorBoard runs, each its own
            out += find_runs(path) or formats.find_logs(path)
        elif is_mlflow_db(path):
            out += formats.find_logs(path)  # mlflow.db/<run id> for each run of a database of several
        else:
            out.append(path)
    return out


def logs_left_out(paths: list[str | Path]) -> list[str]:
    """A note for each folder in ``paths`` that `expand` replaces by the runs below it while files beside them look
    like training logs (`keel.doctor.formats.logs_left_out`): those are not drawn unless given themselves."""
    folders = [Path(path) for path in paths if not (Path(path) / SWEEP_STORE_NAME).is_file()]  # a sweep is itself
    return [note for folder in folders if (note := formats.logs_left_out(folder, "keel report")) is not None]


def classify(path: Path) -> Source:
    """The kind of store at ``path`` (a folder holding ``run.sqlite``, or an SQLite file)."""
    file = path / STORE_NAME if path.is_dir() else path
    if is_mlflow_db(file):  # an SQLite file, but a log: read by keel doctor's reader
        return Source(path=path, kind=None, store=False, note=f"{path}: an MLflow database")
    if path.is_dir() and not file.is_file() and (path / SWEEP_STORE_NAME).is_file():
        file = path / SWEEP_STORE_NAME
    if not file.is_file():
        return Source(
            path=path,
            kind=None,
            store=False,
            note=f"{path}: no store here (no {STORE_NAME}, {SWEEP_STORE_NAME} or run folder one or two levels down)",
        )
    try:
        conn = connect_for_reading(file)
        try:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        # a damaged store file is a note beside the other runs; any other file is not a store at all
        return Source(
            path=path, kind=None, store=file.suffix == STORE_SUFFIX, note=f"{file}: not an SQLite store ({exc})"
        )
    for kind in STORE_KINDS:
        if kind.tables <= tables:
            return Source(path=path, kind=kind.name)
    listed = ", ".join(sorted(tables)) or "none"
    return Source(
        path=path,
        kind=None,
        note=f"{file}: a store of a kind this report does not show yet (tables: {listed}); skipped",
    )
