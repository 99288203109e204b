"""What the report can read, and the extension point for what it cannot: one `StoreKind` per store schema.

A path given to `keel report` is classified by the tables of its SQLite file. The report reads run stores
(``meta``, ``signals``, ``findings``, ``decisions``, ``snapshots``) itself. A sweep store
(``sweep_dir/sweep.sqlite``: ``meta``, ``runs``) belongs to `keel.proxy.sweep`, which the report layer may not
import (it is training code); its section is built there — ``keel.proxy.sweep.sweep_section(sweep_dir)``,
an HTML fragment with inline PNGs — and either handed to ``write_report(..., sections=[fragment])`` by a
caller allowed to import both, or written by ``keel sweep`` next to the store (``sweep_section.html``),
where the report picks it up when given the sweep directory (`sweep_fragment`). Anything else unknown is
skipped with a note, never an error. A new store kind: add a `StoreKind` here, then either read it in the
report (through the store layer) or have its owner render a section.
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
    # A run store is known by its signals; a missing findings, decisions or snapshots table is a note on the page.
    StoreKind(name="run", tables=frozenset({"meta", "signals"})),
    StoreKind(name="sweep", tables=frozenset({"meta", "runs"})),
]
SWEEP_STORE_NAME = "sweep.sqlite"  # keel.proxy.sweep's store file (its schema is that package's)
SWEEP_SECTION_NAME = "sweep_section.html"  # the section `keel sweep` renders next to its store
NOTES = {
    "sweep": "a sweep store: its plots come from keel.proxy.sweep.sweep_section(dir), passed to "
             "write_report(..., sections=[...]), or from the sweep_section.html that `keel sweep` writes "
             "next to the store (none here: `keel sweep --out DIR --summarize` writes it)",
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


def sweep_fragment(path: Path) -> tuple[str | None, str]:
    """The section ``keel sweep`` rendered next to the sweep store at ``path``, and a note for the page.

    Returns:
        ``(fragment, "")`` when the fragment is at least as new as the store; ``(fragment, note)`` when the
        sweep changed after it was rendered (a live or resumed sweep); ``(None, note)`` when there is none.
    """
    folder = path if path.is_dir() else path.parent
    fragment = folder / SWEEP_SECTION_NAME
    if not fragment.is_file():
        return None, f"{folder}: {NOTES['sweep']}"
    # A live sweep appends to the WAL file, its main file changes at each checkpoint. An empty WAL file is
    # one a reader created (this report's own classify() does), not a change.
    store = [folder / SWEEP_STORE_NAME, folder / f"{SWEEP_STORE_NAME}-wal"]
    changed = max((p.stat().st_mtime for p in store if p.is_file() and p.stat().st_size > 0), default=0.0)
    note = ""
    if changed > fragment.stat().st_mtime:
        note = (f"{folder}: the sweep changed after its section was rendered; "
                f"`keel sweep --out {folder} --summarize` renders it again")
    return fragment.read_text(encoding="utf-8"), note
