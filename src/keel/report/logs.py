"""Training logs in the report: a path that holds no store but is a log `keel doctor` reads (CSV, JSONL,
TensorBoard, ``trainer_state.json``, Megatron, fairseq … stdout) is examined and drawn as a run — its signals,
the doctor's findings and named causes — from a run store written for the page (`keel.doctor.to_store`), its
signals given from memory as that store would hold them (`keel.doctor.to_store.stored_series`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from keel.doctor import LogReadError, read_log
from keel.doctor.examine import examine_timeline
from keel.doctor.to_store import stored_series, write_store
from keel.report.sources import Source


def logs_as_runs(sources: list[Source], scratch: Path, *, on_read: Callable[[], None] = lambda: None) -> list[Source]:
    """``sources`` with each path that holds no store read as a log, its run store written under ``scratch``; a path
    that is no log either keeps ``store=False``, its note saying why. ``on_read`` is called after each log (a
    progress bar's callback)."""
    out: list[Source] = []
    for number, source in enumerate(sources):
        if source.store:
            out.append(source)
            continue
        run_dir = scratch / f"log-{number}"
        try:
            result, timeline = examine_timeline(read_log(source.path))
        except LogReadError as exc:
            out.append(replace(source, note=f"{source.note}, and not a training log keel doctor reads ({exc})"))
            on_read()
            continue
        # the store without its signals: the page takes them from the timeline (writing a wide log's every value
        # and reading it back was 30 s of a 35 s report); the rest is read back as from any store
        write_store(result, timeline, run_dir, signals=False)
        out.append(Source(path=run_dir, kind="run", log=source.path, series=stored_series(timeline)))
        on_read()
    return out
