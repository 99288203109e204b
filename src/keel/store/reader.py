"""RunReader: reads a run store with the standard library and NumPy only (no torch).

Opens the file read-only, so it can read a store that a live run is still writing.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from keel._core.decision import Decision
from keel._core.finding import Finding, severity_rank
from keel.store.schema import store_path


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


class RunReader:
    """The read side of a run store.

    Args:
        run: A run directory or the path of its ``run.sqlite``.

    Raises:
        FileNotFoundError: No store at that path.
    """

    def __init__(self, run: str | Path) -> None:
        self.path = store_path(run)
        if not self.path.is_file():
            raise FileNotFoundError(f"no keel run store at {self.path}")
        self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}

    def signal_keys(self) -> list[str]:
        return [k for (k,) in self._conn.execute("SELECT DISTINCT key FROM signals ORDER BY key")]

    def signal(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one signal in step order; NaN where a value was NaN."""
        rows = self._conn.execute("SELECT step, value FROM signals WHERE key = ? ORDER BY step, rowid", (key,))
        data = rows.fetchall()
        steps = np.array([s for s, _ in data], dtype=np.int64)
        values = np.array([_float(v) for _, v in data], dtype=np.float64)
        return steps, values

    def findings(self, min_severity: str | None = None) -> list[Finding]:
        rows = self._conn.execute("SELECT * FROM findings ORDER BY step, rowid").fetchall()
        found = [Finding(step=r[0], kind=r[1], severity=r[2], signal=r[3], value=_float(r[4]),
                         baseline=_float(r[5]), evidence=json.loads(r[6]), cause=r[7], remedy=r[8]) for r in rows]
        if min_severity is None:
            return found
        floor = severity_rank(min_severity)
        return [f for f in found if severity_rank(f.severity) >= floor]

    def decisions(self) -> list[Decision]:
        rows = self._conn.execute("SELECT step, action, reason, actor, onset, restored_step FROM decisions "
                                  "ORDER BY step, rowid")
        return [Decision(step=s, action=a, reason=r, by=b, onset=o, restored_step=rs) for s, a, r, b, o, rs in rows]

    def snapshots(self) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT step, path, checksum, created FROM snapshots ORDER BY step, rowid")
        return [dict(step=s, path=p, checksum=c, created=t) for s, p, c, t in rows]
