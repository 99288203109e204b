"""What the report can read, and the extension point for what it cannot: one `StoreKind` per store schema.

A path given to `keel report` is classified by the tables of its SQLite file. The report reads run stores
(``meta``, ``signals``, ``findings``, ``decisions``, ``snapshots``) itself. A sweep store
(``sweep_dir/sweep.sqlite``: ``meta``, ``runs``) belongs to `keel.proxy.sweep`, which the report layer may not
import (it is training code); its section is built there — ``keel.proxy.sweep.sweep_section(sweep_dir)``,
an HTML fragment with inline PNGs — and handed to ``write_report(..., sections=[fragment])`` by a caller
allowed to import both (``keel demo``, a ``keel`` verb module at the top layer, or the user). Given directly,
a sweep store is skipped with a note that says so; anything else unknown is skipped with a note too, never
an error. A new store kind: add a `StoreKind` here, then either read it in the report (through the store
layer) or have its owner render a section.
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
    StoreKind(name="sweep", tables=frozenset({"meta", "runs"})),
]
SWEEP_STORE_NAME = "sweep.sqlite"  # keel.proxy.sweep's store file (its schema is that package's)
NOTES = {
    "sweep": "a sweep store: its plots come from keel.proxy.sweep.sweep_section(dir), passed to "
             "write_report(..., sections=[...]); skipped here",
}


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
        if path.is_dir() and not (path / STORE_NAME).is_file() and not (path / SWEEP_STORE_NAME).is_file():
            children = sorted(p for p in path.iterdir() if (p / STORE_NAME).is_file())
            out += children or [path]
        else:
            out.append(path)
    return out


def classify(path: Path) -> Source:
    """The kind of store at ``path`` (a folder holding ``run.sqlite``, or an SQLite file)."""
    file = path / STORE_NAME if path.is_dir() else path
    if path.is_dir() and not file.is_file() and (path / SWEEP_STORE_NAME).is_file():
        file = path / SWEEP_STORE_NAME
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
            note = f"{file}: {NOTES[kind.name]}" if kind.name in NOTES else ""
            return Source(path=path, kind=kind.name, note=note)
    listed = ", ".join(sorted(tables)) or "none"
    return Source(path=path, kind=None,
                  note=f"{file}: a store of a kind this report does not show yet (tables: {listed}); skipped")
