"""A log `keel doctor` reads, written as a keel run store: its signals at their steps, the doctor's findings and
named causes, and meta saying where it came from — so `keel report` draws any log as it draws a run.

A restarted log (a step number that comes back) is stored as its store would be after a resume: the rows from
the restart's step on are those of the later stretch. The findings of every stretch are kept (their evidence
names the stretch: ``segment``), as `keel doctor` lists them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keel.doctor.examine import examine_timeline
from keel.doctor.formats import read_log
from keel.doctor.result import DoctorResult
from keel.store import RunWriter

STATUS = "a log examined by keel doctor"


def log_to_store(path: str | Path, run_dir: str | Path, *, format: str | None = None) -> DoctorResult:
    """Examine the log at ``path`` and write it as a run store in ``run_dir``.

    Args:
        path: Any log `keel.doctor.read_log` reads.
        run_dir: The folder to write ``run.sqlite`` in (created).
        format: Force a reader (see `keel.doctor.FORMATS`).

    Returns:
        The `DoctorResult`, as `keel.doctor.examine_log` gives it.

    Raises:
        LogReadError: The path is missing or not a usable log.

    Example:
        >>> import tempfile, pathlib
        >>> from keel.store import RunReader
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.csv"
        >>> _ = p.write_text("step,loss\\n0,2.5\\n1,nan\\n")
        >>> _ = log_to_store(p, p.parent / "run")
        >>> reader = RunReader(p.parent / "run")
        >>> reader.meta()["format"], [f.kind for f in reader.findings()]
        ('csv', ['non_finite'])
    """
    result, timeline = examine_timeline(read_log(path, format))
    with RunWriter(run_dir) as writer:
        writer.set_meta(
            {
                "source": result.source,
                "format": result.format,
                "status": STATUS,
                "policy": "none (a log)",
                "steps": result.summary["observations"],
                "diagnosis": result.summary["diagnosis"],
                "notes": result.summary["notes"],
            }
        )
        steps = timeline.steps
        if np.all(steps[1:] > steps[:-1]):  # no restart: each signal as one batch (a wide log wrote 10x faster)
            for key, column in timeline.signals.items():
                writer.add_series(key, steps[column.rows].tolist(), column.values.tolist())
        else:
            last: int | None = None
            for obs in timeline.iter_observations():
                if last is not None and obs.step <= last:
                    writer.drop_from(obs.step)  # a restart: the later stretch's rows, as after a resume
                writer.add_signals(obs.step, obs.values)
                last = obs.step
        writer.add_findings(result.findings)
        for decision in result.decisions:
            writer.add_decision(decision)
    return result
