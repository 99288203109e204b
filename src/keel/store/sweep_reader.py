"""SweepReader: reads a sweep store (``sweep_dir/sweep.sqlite``) with the standard library only (no torch).

Opens the file read-only, so it can follow a live sweep. Like `RunReader` it treats the file as untrusted
input: every value's type is checked, a row of the wrong type is left out and counted in `problems`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from keel.store._columns import Column, StoreFile, parse_json, read_meta
from keel.store.sweep_schema import SUMMARY_KEY, sweep_store_path

# A run's measured reals, NULL (NaN) until it finishes; the router's three are NULL for a dense model and missing
# from a store an older keel wrote (nullable columns read as NULL there).
MEASURED = (
    "init_loss",
    "final_loss",
    "val_loss",
    "max_attn_logit",
    "log_z",
    "grad_norm",
    "router_z",
    "load_imbalance",
    "dead_experts",
    "wall_s",
)
REALS = ("lr", *MEASURED, "started", "finished")
RUNS = (
    Column("run_id", "text"),
    Column("recipe", "text"),
    Column("size", "text"),
    Column("lr", "real"),
    Column("seed", "int"),
    Column("status", "text"),
    Column("config", "text", nullable=True),
    *(Column(name, "real", nullable=True) for name in MEASURED),
    Column("n_params", "int", nullable=True),
    Column("steps_done", "int", nullable=True),
    Column("error", "text", nullable=True),
    Column("run_dir", "text"),
    Column("attempts", "int"),
    Column("started", "real", nullable=True),
    Column("finished", "real", nullable=True),
)


class SweepReader:
    """The read side of a sweep store.

    Args:
        sweep: The sweep directory or its ``sweep.sqlite``.

    Attributes:
        root: The sweep directory (run folders are stored relative to it).
        problems: Rows left out because a value had the wrong type, one line per table.

    Raises:
        FileNotFoundError: No sweep store there.
        StoreError: The file is not SQLite; a method raises it when its table or a required column is missing.

    Example:
        >>> with SweepReader("runs/sweep-quick") as sweep:  # doctest: +SKIP
        ...     [r["status"] for r in sweep.rows()]
        ['done', 'done', 'diverged', ...]
    """

    def __init__(self, sweep: str | Path) -> None:
        self.path = sweep_store_path(sweep)
        self.root = self.path.parent
        self._file = StoreFile(self.path, "sweep store")

    @property
    def problems(self) -> list[str]:
        return self._file.problems

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SweepReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self) -> dict[str, Any]:
        """The sweep's config, environment and summary (see `keel.store.sweep_schema`)."""
        return read_meta(self._file)

    def summary(self) -> Any:
        """The summary the sweep stored when it last finished (`SUMMARY_KEY`), or None; not checked here: the
        document is the proxy package's, its reader checks it."""
        return self.meta().get(SUMMARY_KEY)

    def rows(self) -> list[dict[str, Any]]:
        """Every run as a dict of the ``runs`` columns, in insertion order: NULL reals read back as NaN,
        ``config`` parsed, ``run_dir`` joined to the sweep directory."""
        out = []
        for values in self._file.rows("runs", RUNS):
            row = dict(zip((c.name for c in RUNS), values, strict=True))
            try:
                row["config"] = None if row["config"] is None else parse_json(row["config"])
            except ValueError as exc:
                self._file.drop("runs", f"config of {row['run_id']!r} is not JSON ({exc})")
                continue
            for name in REALS:
                row[name] = math.nan if row[name] is None else float(row[name])
            if not (row["lr"] > 0 and math.isfinite(row["lr"])):  # every LR curve and fit takes its log
                self._file.drop("runs", f"lr of {row['run_id']!r} is {row['lr']!r}; allowed: a finite number > 0")
                continue
            row["run_dir"] = str(self.root / row["run_dir"])  # stored relative to the sweep directory
            out.append(row)
        return out
