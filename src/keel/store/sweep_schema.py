"""The sweep store's SQLite schema: one file per sweep (``sweep_dir/sweep.sqlite``), one row per run.

`keel.proxy.sweep` writes it (only the process that drives the sweep: workers return results; WAL mode lets a
reader follow a live sweep) and reads it back through `keel.store.SweepReader`, as the report does; both need
neither torch nor the proxy package for that.

Schema (``runs``): ``run_id`` (primary key), ``recipe``, ``size``, ``lr``, ``seed``, ``status`` (pending,
running, done, diverged, error), ``config`` (JSON of the run's `TrainConfig`), ``init_loss``,
``final_loss``, ``val_loss``, ``max_attn_logit``, ``log_z``, ``grad_norm``, ``n_params``, ``steps_done``,
``wall_s``, ``error``, ``run_dir`` (relative to the sweep directory), ``attempts``, ``started``,
``finished``, and the router's end signals ``router_z``, ``load_imbalance``, ``dead_experts`` (NULL for a dense
model; `ADDED_COLUMNS`, which a store an older keel wrote gains when it is opened for writing:
`add_missing_columns`). ``meta`` holds the sweep's config and environment as JSON, and under `SUMMARY_KEY` the
summary the sweep computed when it last finished (the ``keel sweep --json`` document: LR sensitivity per recipe and
size, the scaling view), which the report shows as it is rather than computing it again. NaN is stored as NULL
and read back as NaN.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from keel.store.schema import STORE_SUFFIX

SWEEP_STORE_NAME = "sweep.sqlite"
SUMMARY_KEY = "summary"

SWEEP_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, recipe TEXT NOT NULL, size TEXT NOT NULL, lr REAL NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL, config TEXT, init_loss REAL, final_loss REAL, val_loss REAL, max_attn_logit REAL,
    log_z REAL, grad_norm REAL, n_params INTEGER, steps_done INTEGER, wall_s REAL, error TEXT,
    run_dir TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, started REAL, finished REAL,
    router_z REAL, load_imbalance REAL, dead_experts REAL
);
"""
# Columns of ``runs`` added after the first sweep stores were written, with their SQL types: a store without them
# gains them when opened for writing (`add_missing_columns`); the reader reads them as NULL where they are missing.
ADDED_COLUMNS = (("router_z", "REAL"), ("load_imbalance", "REAL"), ("dead_experts", "REAL"))


def add_missing_columns(conn: sqlite3.Connection) -> list[str]:
    """Add the `ADDED_COLUMNS` a store written by an older keel lacks to its ``runs`` table (NULL in its rows, as a
    run that measured nothing), so it can resume; return the names added."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    added = [name for name, _ in ADDED_COLUMNS if name not in present]
    for name, sql_type in ADDED_COLUMNS:
        if name in added:
            conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}")
    return added


def sweep_store_path(sweep: str | Path) -> Path:
    """``sweep_dir/sweep.sqlite``, or the path itself when it already names a ``.sqlite`` file."""
    path = Path(sweep)
    return path if path.suffix == STORE_SUFFIX else path / SWEEP_STORE_NAME


def sweep_given_as_run(path: Path) -> str | None:
    """What to say when ``path``, given where a run store is read (``keel doctor``, ``keel export``), is a sweep's
    folder or its ``sweep.sqlite``; None when it is neither."""
    folder = path.parent if path.name == SWEEP_STORE_NAME else path
    if not (folder / SWEEP_STORE_NAME).is_file():
        return None
    return (
        f"{folder}: a keel sweep, not a run; allowed: keel report {folder} (its tables and figures), or one of its "
        f"runs ({folder / 'runs'}/<recipe>/<size>/lr=<lr>/seed=<seed>)"
    )
