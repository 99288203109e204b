"""A log `keel doctor` reads, written as a keel run store: its signals at their steps, the doctor's findings and
named causes, and meta saying where it came from — so `keel report` draws any log as it draws a run.

A restarted log (a step number that comes back) is stored as its store would be after a resume: the rows from
the restart's step on are those of the later stretch, and so are the findings there; the findings of the stretch a
restart replaced are left out (a note counts them; `keel doctor` lists them, with their ``segment``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keel._core.finding import Finding
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
    steps = timeline.steps
    restarts = steps[1:][steps[1:] <= steps[:-1]].tolist()  # the step each later stretch starts at, in order
    kept = [f for f in result.findings if not _abandoned(f, restarts)]
    notes = list(result.summary["notes"])
    if len(kept) < len(result.findings):
        notes.append(
            f"{len(result.findings) - len(kept)} findings of stretches a restart replaced are left out of this store "
            "(keel doctor lists them)"
        )
    with RunWriter(run_dir) as writer:
        writer.set_meta(
            {
                "source": result.source,
                "format": result.format,
                "status": STATUS,
                "policy": "none (a log)",
                "steps": len(np.unique(steps)),
                "diagnosis": result.summary["diagnosis"],
                "notes": notes,
            }
        )
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
        writer.add_findings(kept)
        for decision in result.decisions:
            writer.add_decision(decision)
    return result


def _abandoned(finding: Finding, restarts: list[int]) -> bool:
    """Whether a later stretch restarted at or before the finding's step: its rows replaced the finding's stretch's
    there (`keel.doctor.examine` numbers the stretches after a restart in the ``segment`` evidence)."""
    segment = int(finding.evidence.get("segment", 0))
    return any(start <= finding.step for start in restarts[segment:])
