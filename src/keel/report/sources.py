"""What the report can read, and the extension point for what it cannot yet: one `StoreKind` per store schema.

A path given to `keel report` is classified by the tables of its SQLite file. Today there is one kind, the
run store (``meta``, ``signals``, ``findings``, ``decisions``, ``snapshots``). Anything else — a sweep store,
whose schema does not exist yet, or an unrelated SQLite file — is skipped with a note on the page, never an
error. To add the sweep plots once the sweep store lands:

1. write ``report/sweep.py`` with a loader ``load_sweep(path) -> SweepData`` (through the store layer's
   reader, like `keel.report.run_data.load_run`) and a section builder returning HTML and chart specs
   (final loss against learning rate per recipe, one line per recipe, log-x);
2. register it here: ``STORE_KINDS.append(StoreKind(name="sweep", tables=frozenset({...})))``;
3. in `keel.report.page.build_page`, render the sources of kind ``"sweep"`` with it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from keel.store import STORE_NAME


@dataclass(frozen=True, kw_only=True)
class StoreKind:
    """A store schema the report understands: its name and the tables that identify it."""

    name: str
    tables: frozenset[str]


STORE_KINDS: list[StoreKind] = [
    StoreKind(name="run", tables=frozenset({"meta", "signals", "findings", "decisions", "snapshots"})),
]


@dataclass(frozen=True, kw_only=True)
class Source:
    """One path given to the report, classified: ``kind`` is a `StoreKind` name, or None with a ``note``."""

    path: Path
    kind: str | None
    note: str = ""


def expand(paths: list[str | Path]) -> list[Path]:
    """Each path as given, except that a folder without a store stands for the stores in its sub-folders
    (``keel report runs/demo`` → ``runs/demo/bare``, ``runs/demo/guarded`` …), in name order."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not (path / STORE_NAME).is_file():
            children = sorted(p for p in path.iterdir() if (p / STORE_NAME).is_file())
            out += children or [path]
        else:
            out.append(path)
    return out


def classify(path: Path) -> Source:
    """The kind of store at ``path`` (a folder holding ``run.sqlite``, or an SQLite file)."""
    file = path / STORE_NAME if path.is_dir() else path
    if not file.is_file():
        return Source(path=path, kind=None, note=f"{path}: no store here (no {STORE_NAME})")
    try:
        conn = sqlite3.connect(f"file:{file}?mode=ro", uri=True)
        try:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Source(path=path, kind=None, note=f"{file}: not an SQLite store ({exc})")
    for kind in STORE_KINDS:
        if kind.tables <= tables:
            return Source(path=path, kind=kind.name)
    listed = ", ".join(sorted(tables)) or "none"
    return Source(path=path, kind=None,
                  note=f"{file}: a store of a kind this report does not show yet (tables: {listed}); skipped")
