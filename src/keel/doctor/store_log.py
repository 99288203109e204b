"""keel run stores (``run_dir/run.sqlite``): the signals a Guard recorded, and the findings it saw live.

The signals are read back as records, one per step, with their keel keys; the detectors then run on them
exactly as on any other log, and the findings the Guard stored are kept alongside for comparison.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from keel.doctor.log import LogReadError, RawLog
from keel.store import RunReader, store_path

SQLITE_MAGIC = b"SQLite format 3\x00"


def is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def read_store_log(path: str | Path) -> RawLog:
    """Read a keel run store (its folder or its ``run.sqlite``).

    Raises:
        LogReadError: No store there, an SQLite file that is not a run store, or a store with no signals.
    """
    path = Path(path)
    file = store_path(path)
    if not file.is_file():
        raise LogReadError(f"{path}: no keel run store ({file.name}) here")
    try:
        with RunReader(file) as run:
            log = RawLog(source=str(path), format="keel_store", keyed=True, step_column="step")
            by_step: dict[int, dict[str, float]] = {}
            for key in run.signal_keys():
                steps, values = run.signal(key)
                for step, value in zip(steps.tolist(), values.tolist(), strict=True):
                    by_step.setdefault(step, {})[key] = value
            log.records = sorted(by_step.items())
            meta = run.meta()
            try:
                log.stored_findings = run.findings()
            except sqlite3.Error as exc:
                log.notes.append(f"the stored findings could not be read ({exc})")
            try:
                log.rollbacks = {d.step: d.restored_step for d in run.decisions()
                                 if d.action == "rollback" and d.restored_step is not None}
            except sqlite3.Error as exc:
                log.notes.append(f"the stored decisions could not be read ({exc}); "
                                 "rollbacks are not replayed")
    except sqlite3.Error as exc:
        raise LogReadError(f"{file}: not a keel run store ({exc})") from None
    if not log.records:
        raise LogReadError(f"{file}: the run store holds no signals yet")
    log.meta = {k: meta[k] for k in ("status", "policy", "steps", "seed", "diagnosis") if k in meta}
    return log
