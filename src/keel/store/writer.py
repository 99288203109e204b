"""RunWriter: appends a run's rows to its SQLite store from a background thread, in batches.

The training loop only appends tuples to a queue (no I/O on the step path, and no thread wake-up: the writer
sleeps between flushes, so it never competes with the step for the GIL). Every ``flush_interval`` seconds —
or at once on `flush`/`close` — the thread drains the queue and commits it in one transaction, so a process
killed at any moment keeps every committed batch (WAL mode). A failing disk never stops training: the error
is warned about once, rows are dropped, and `errors` counts them.
"""

from __future__ import annotations

import functools
import json
import math
import queue
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from keel._core.decision import Decision
from keel._core.errors import KeelWarning
from keel._core.example_ids import format_ids
from keel._core.finding import Finding
from keel.store.schema import connect_for_writing, store_path

_STOP = object()


# `RunWriter.add_series` inserts this many rows per statement: SQLite's per-statement work (Python binding one
# row's tuple, stepping and resetting the statement) was most of writing a log's 5 M values row by row (9 s of CPU
# for a 100k-step x 50-column log, 3x this way). 200 rows are 401 parameters: under SQLite's oldest limit (999).
SERIES_ROWS_PER_INSERT = 200


def _real(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@functools.lru_cache(maxsize=8)
def _series_insert(rows: int) -> str:
    """The statement that inserts ``rows`` rows of one signal: its key once, then (step, value) pairs, in order."""
    return "INSERT INTO signals SELECT column1, ?, column2 FROM (VALUES " + ", ".join(["(?, ?)"] * rows) + ")"


class RunWriter:
    """The write side of a run store.

    Example:
        >>> import tempfile
        >>> with RunWriter(tempfile.mkdtemp()) as w:
        ...     w.set_meta({"seed": 0})
        ...     w.add_signals(0, {"loss": 2.5})
    """

    def __init__(self, run_dir: str | Path, *, flush_interval: float = 0.5) -> None:
        self.path = store_path(run_dir)
        self.flush_interval = flush_interval
        self.errors = 0
        self._conn = connect_for_writing(self.path)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="keel-run-writer", daemon=True)
        self._thread.start()

    # --- called from the training loop: enqueue only -------------------------------------------------
    def set_meta(self, items: Mapping[str, Any]) -> None:
        rows = [(k, json.dumps(v, default=str)) for k, v in items.items()]
        self._queue.put(("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows))

    def add_signals(self, step: int, values: Mapping[str, float]) -> None:
        self._queue.put(("INSERT INTO signals VALUES (?, ?, ?)", [(step, k, _real(v)) for k, v in values.items()]))

    def add_series(self, key: str, steps: Iterable[int], values: Iterable[float]) -> None:
        """One signal's values at many steps, enqueued as one batch (a log written whole: `keel.doctor.to_store`).
        The rows are made column by column, `SERIES_ROWS_PER_INSERT` to a statement: a NaN is NULL, as in
        `add_signals`, and the table holds what adding each (step, value) with `add_signals` would, in order."""
        step_array = np.asarray(steps if isinstance(steps, np.ndarray) else list(steps), dtype=np.int64)
        value_array = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
        if step_array.shape != value_array.shape or step_array.ndim != 1:
            raise ValueError(f"add_series({key!r}): {step_array.shape} steps and {value_array.shape} values")
        rows = np.empty((len(value_array), 2), dtype=object)  # Python ints and floats, as SQLite binds them
        rows[:, 0] = step_array
        rows[:, 1] = value_array
        rows[np.isnan(value_array), 1] = None
        per = SERIES_ROWS_PER_INSERT
        whole = len(rows) - len(rows) % per
        if whole:
            statements = np.empty((whole // per, 1 + 2 * per), dtype=object)  # the key, then the pairs
            statements[:, 0] = key
            statements[:, 1:] = rows[:whole].reshape(-1, 2 * per)
            self._queue.put((_series_insert(per), statements.tolist()))
        if whole < len(rows):
            self._queue.put((_series_insert(len(rows) - whole), [[key, *rows[whole:].ravel().tolist()]]))

    def add_findings(self, findings: Iterable[Finding]) -> None:
        rows = [
            (
                f.step,
                f.kind,
                f.severity,
                f.signal,
                _real(f.value),
                _real(f.baseline),
                json.dumps(f.evidence, default=str),
                f.cause,
                f.advice,
            )
            for f in findings
        ]
        if rows:
            self._queue.put(("INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows))

    def add_decision(self, decision: Decision) -> None:
        row = (decision.step, decision.action, decision.reason, decision.by, decision.onset, decision.restored_step)
        self._queue.put(("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?)", [row]))

    def add_batch(self, step: int, ids: Iterable[int]) -> None:
        """The example ids the step's batch held, stored as ranges (`keel._core.example_ids.format_ids`)."""
        self._queue.put(("INSERT INTO batches VALUES (?, ?)", [(step, format_ids(ids))]))

    def add_snapshot(self, step: int, path: str, checksum: str) -> None:
        self._queue.put(("INSERT INTO snapshots VALUES (?, ?, ?, ?)", [(step, path, checksum, time.time())]))

    def drop_from(self, step: int) -> None:
        """Delete the rows of steps ``>= step`` (snapshots: ``> step``): a run resumed from the snapshot of ``step``
        does those steps again, and its store should read as one uninterrupted run, not hold them twice."""
        tables = ("signals", ">="), ("findings", ">="), ("decisions", ">="), ("batches", ">="), ("snapshots", ">")
        for table, op in tables:
            self._queue.put((f"DELETE FROM {table} WHERE step {op} ?", [(step,)]))

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until everything enqueued so far is committed, or ``timeout`` seconds pass.

        Returns:
            Whether it was committed in time (True at once after `close`, which commits everything).
        """
        if self._closed:  # the thread has stopped: waiting for it would only run out the timeout
            return True
        done = threading.Event()
        self._queue.put(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._wake.set()
        self._thread.join()  # every queued row is committed before close returns: a bounded wait dropped rows
        self._conn.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            batch: list[tuple[str, list[tuple]]] = []
            waiters: list[threading.Event] = []
            stop = False
            while True:  # drain what is queued now; later puts wait for the next round
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                elif isinstance(item, threading.Event):
                    waiters.append(item)
                else:
                    batch.append(item)
            self._commit(batch)
            for waiter in waiters:
                waiter.set()
            if stop:
                return

    def _commit(self, batch: list[tuple[str, list[tuple]]]) -> None:
        if not batch:
            return
        try:
            self._conn.execute("BEGIN")
            for sql, rows in batch:
                self._conn.executemany(sql, rows)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.errors += sum(len(rows) for _, rows in batch)
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"keel run store {self.path} could not be written ({exc}); training goes on, rows are dropped",
                    KeelWarning,
                    stacklevel=1,
                )
