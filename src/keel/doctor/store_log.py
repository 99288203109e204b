"""keel run stores (``run_dir/run.sqlite``): the signals a Guard recorded, and the findings it saw live.

The signals are read back as records, one per step, with their keel keys; the detectors then run on them
exactly as on any other log, and the findings the Guard stored are kept alongside for comparison, with its
decisions (skips, rollbacks and the actions they applied, aborts) and the phases and evals it declared
(`keel.doctor.phases`: the baselines restart at a task switch, as they did live).

A store is untrusted input: `RunReader` leaves out rows whose values have the wrong type and says so
(`RunReader.problems`, passed on as notes); the metadata shown here is checked on this side too — a recorded
diagnosis must be a list of objects with a ``summary`` text, the run facts must be plain values.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from keel.doctor.log import LogReadError, RawLog
from keel.doctor.phases import read_declared
from keel.doctor.table import MAX_STEP, Column, LogTable
from keel.store import RunReader, find_runs, store_path

SQLITE_MAGIC = b"SQLite format 3\x00"
META_FACTS = ("status", "policy", "steps", "seed")  # shown as they are: must be plain values


def is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def read_store_log(path: str | Path) -> RawLog:
    """Read a keel run store (its folder or its ``run.sqlite``), or the one run store a folder holds one or two
    levels down (``runs/X`` holding ``runs/X/keel``: a note says which was read).

    Raises:
        LogReadError: No store there, a folder of several runs (`keel.doctor.find_logs` lists them), an SQLite
            file that is not a run store, or a store with no signals.
    """
    path = Path(path)
    file = store_path(path)
    found = ""
    if not file.is_file() and path.is_dir():
        runs = find_runs(path)
        if len(runs) > 1:
            names = ", ".join(p.relative_to(path).as_posix() for p in runs[:6]) + (" …" if len(runs) > 6 else "")
            raise LogReadError(
                f"{path}: a folder of {len(runs)} keel runs ({names}); keel doctor examines each, "
                f"examine_log reads one, e.g. {runs[0]}"
            )
        if runs:
            found = f"{path} holds one keel run store, {runs[0]}: examined that"
            path, file = runs[0], store_path(runs[0])
    if not file.is_file():
        raise LogReadError(f"{path}: no keel run store ({file.name}) here")
    log = RawLog(source=str(path), format="keel_store", keyed=True, step_column="step", notes=[found] if found else [])
    try:
        with RunReader(file) as run:
            log.records = _signals(run, log.notes)
            meta = run.meta()
            try:
                log.stored_findings = run.findings()
            except sqlite3.Error as exc:
                log.notes.append(f"the stored findings could not be read ({exc})")
            try:
                log.decisions = run.decisions()
                log.rollbacks = {
                    d.step: d.restored_step
                    for d in log.decisions
                    if d.action == "rollback" and isinstance(d.restored_step, int)
                }
            except sqlite3.Error as exc:
                log.notes.append(f"the stored decisions could not be read ({exc}); rollbacks are not replayed")
            log.notes += [f"the store: {problem}" for problem in getattr(run, "problems", [])]
    except sqlite3.Error as exc:
        raise LogReadError(f"{file}: not a keel run store ({exc})") from None
    if not len(log.records):
        raise LogReadError(f"{file}: the run store holds no signals yet")
    log.meta = _meta(meta, log.notes)
    log.declared = read_declared(meta, list(log.records.columns), log.notes)
    return log


def _signals(run: RunReader, notes: list[str]) -> LogTable:
    """Every signal, one record per step (a step stored twice keeps its last value, as it always did)."""
    series = {}
    for key in run.signal_keys():
        steps, values = run.signal(key)
        steps, values = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
        last = np.ones(len(steps), dtype=bool)
        last[:-1] = steps[1:] != steps[:-1]  # in step order, then row order: the later row wins
        series[key] = (steps[last], values[last])
    all_steps = np.unique(np.concatenate([s for s, _ in series.values()])) if series else np.zeros(0, np.int64)
    usable = np.abs(all_steps) < MAX_STEP
    if not usable.all():
        notes.append(f"{int((~usable).sum())} step(s) beyond ±2**61 were left out")
        all_steps = all_steps[usable]
    columns = {}
    for key, (steps, values) in series.items():
        keep = np.abs(steps) < MAX_STEP
        if keep.any():
            columns[key] = Column(rows=np.searchsorted(all_steps, steps[keep]), values=values[keep])
    return LogTable(all_steps, columns)


def _meta(meta: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The run facts worth showing, each checked: what is malformed is left out and noted."""
    out: dict[str, Any] = {}
    for key in META_FACTS:
        if key in meta:
            value = meta[key]
            if value is None or isinstance(value, (str, int, float, bool)):
                out[key] = value
            else:
                notes.append(f"the store's {key!r} is not a plain value; left out")
    if "diagnosis" in meta:
        kept, dropped = _diagnoses(meta["diagnosis"])
        if kept:
            out["diagnosis"] = kept
        if dropped:
            notes.append(f"the recorded diagnosis: {dropped} entr(ies) without a 'summary' text were left out")
    return out


def _diagnoses(recorded: Any) -> tuple[list[dict[str, Any]], int]:
    """The recorded diagnoses that have a ``summary`` text, and how many did not."""
    if not isinstance(recorded, list):
        return [], 1
    kept = [d for d in recorded if isinstance(d, dict) and isinstance(d.get("summary"), str)]
    return kept, len(recorded) - len(kept)
