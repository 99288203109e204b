"""Training logs in the report: a path that holds no store but is a log `keel doctor` reads (CSV, JSONL,
TensorBoard, ``trainer_state.json``, Megatron, fairseq … stdout) is examined and drawn as a run — its signals,
the doctor's findings and named causes — from a run store written for the page (`keel.doctor.to_store`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from keel.doctor import LogReadError
from keel.doctor.to_store import log_to_store
from keel.report.sources import Source


def logs_as_runs(sources: list[Source], scratch: Path) -> list[Source]:
    """``sources`` with each path that holds no store read as a log, its run store written under ``scratch``; a path
    that is no log either keeps ``store=False``, its note saying why."""
    out: list[Source] = []
    for number, source in enumerate(sources):
        if source.store:
            out.append(source)
            continue
        run_dir = scratch / f"log-{number}"
        try:
            log_to_store(source.path, run_dir)
        except LogReadError as exc:
            out.append(replace(source, note=f"{source.note}, and not a training log keel doctor reads ({exc})"))
            continue
        out.append(Source(path=run_dir, kind="run", log=source.path))
    return out
