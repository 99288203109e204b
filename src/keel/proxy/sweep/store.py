"""The sweep store: one SQLite file per sweep (``sweep_dir/sweep.sqlite``) with one row per run.

Each row holds the run's recipe, size, LR, seed, status, losses, end signals and the path of the run's
own run store, so a sweep can be summarised, plotted or resumed from this file alone. Only the process
that drives the sweep writes it (workers return results); WAL mode lets a reader follow a live sweep.
The schema has its home in the store layer (`keel.store.sweep_schema`), which reads it back
(`keel.store.SweepReader`) for this package and for the report alike.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

from keel.proxy.trainer import TrainConfig
from keel.store import SweepReader
from keel.store.schema import connect_for_reading
from keel.store.sweep_schema import SWEEP_DDL, SWEEP_STORE_NAME, add_missing_columns, sweep_store_path

__all__ = ["SWEEP_STORE_NAME", "SweepStore", "sweep_store_path"]

_RESULT_FIELDS = (
    "status",
    "init_loss",
    "final_loss",
    "val_loss",
    "max_attn_logit",
    "log_z",
    "grad_norm",
    "router_z",
    "load_imbalance",
    "dead_experts",
    "n_params",
    "steps_done",
    "wall_s",
    "error",
)


class SweepStore:
    """Read and write one sweep's store.

    Args:
        sweep: The sweep directory (or its ``sweep.sqlite``).
        readonly: Open an existing store without writing (for reports and a live sweep).

    Raises:
        FileNotFoundError: ``readonly`` and there is no store.

    Example:
        >>> import tempfile
        >>> with SweepStore(tempfile.mkdtemp()) as store:
        ...     store.rows()
        []
    """

    def __init__(self, sweep: str | Path, *, readonly: bool = False) -> None:
        self.path = sweep_store_path(sweep)
        self.root = self.path.parent
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no keel sweep store at {self.path}")
            self._conn = connect_for_reading(self.path)
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(SWEEP_DDL)
            add_missing_columns(self._conn)  # a sweep an older keel wrote resumes with the columns it lacked
        self._conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SweepStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- meta
    def set_meta(self, items: dict[str, Any]) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [(k, json.dumps(v, default=str)) for k, v in items.items()],
        )

    def meta(self) -> dict[str, Any]:
        with SweepReader(self.path) as reader:  # every value checked, as rows() is
            return reader.meta()

    # ---- runs
    def add_runs(self, specs: list[Any], run_dir_of: Any) -> int:
        """Insert a pending row for each `RunSpec` not yet in the store; return how many were new.

        Raises:
            ValueError: A run already in the store was recorded with a different config (same grid point,
                other settings): resuming would mix two sweeps in one table.
        """
        existing = {r["run_id"]: r["config"] for r in self._conn.execute("SELECT run_id, config FROM runs")}
        new = []
        for spec in specs:
            config = _config_json(spec.config)
            if spec.run_id in existing:
                if existing[spec.run_id] != config:
                    raise ValueError(
                        f"run {spec.run_id} is in {self.path} with config {existing[spec.run_id]}, and this "
                        f"sweep asks for {config}; allowed: the same settings to resume, or a new sweep dir"
                    )
                continue
            new.append(
                (
                    spec.run_id,
                    spec.recipe,
                    spec.size,
                    spec.lr,
                    spec.seed,
                    "pending",
                    config,
                    str(run_dir_of(spec.run_id)),
                )
            )
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany(
                "INSERT INTO runs (run_id, recipe, size, lr, seed, status, config, run_dir) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                new,
            )
        return len(new)

    def unfinished(self, run_ids: list[str], *, errors: bool = False) -> list[str]:
        """The ids among ``run_ids`` not yet done, diverged or errored (pending, or running when killed); with
        ``errors``, the errored ones too (a worker that died, a recipe fixed since)."""
        status = dict(self._conn.execute("SELECT run_id, status FROM runs").fetchall())
        todo = ("pending", "running", "error") if errors else ("pending", "running")
        return [r for r in run_ids if status.get(r) in todo]

    def mark_running(self, run_id: str) -> None:
        self._conn.execute(
            "UPDATE runs SET status = 'running', attempts = attempts + 1, started = ? WHERE run_id = ?",
            (time.time(), run_id),
        )

    def record(self, result: Any) -> None:
        """Write a `RunResult`'s fields into its row and mark it finished."""
        values = [_sql(getattr(result, name)) for name in _RESULT_FIELDS]
        assignments = ", ".join(f"{name} = ?" for name in _RESULT_FIELDS)
        self._conn.execute(
            f"UPDATE runs SET {assignments}, finished = ? WHERE run_id = ?",
            (*values, time.time(), result.run_id),
        )

    def rows(self) -> list[dict[str, Any]]:
        """Every run as a dict (NULL reals read back as NaN, ``run_dir`` joined to the sweep directory), in
        insertion order; read through `keel.store.SweepReader`, which checks every value's type."""
        with SweepReader(self.path) as reader:
            return reader.rows()


def _config_json(config: TrainConfig | None) -> str | None:
    # describe(), not asdict(): unset hooks stay out, so a run stored before TrainConfig had them still matches
    return None if config is None else json.dumps(config.describe(), sort_keys=True)


def _sql(value: Any) -> Any:
    # SQLite has no NaN; NULL stands for it and reads back as NaN.
    return None if isinstance(value, float) and math.isnan(value) else value
