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
from keel.doctor.timeline import Timeline
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
    write_store(result, timeline, run_dir)
    return result


def write_store(result: DoctorResult, timeline: Timeline, run_dir: str | Path, *, signals: bool = True) -> None:
    """Write a log's examination (`keel.doctor.examine_timeline`) as a run store in ``run_dir``: meta, the findings
    a restart did not replace, the log's own decisions and, with ``signals``, every signal's `stored_series`.

    ``signals=False`` leaves the signals table empty, for a caller that has the series in memory already (`keel
    report` of a log: writing a 100k-step x 50-column log's 5 M values, then reading them back, took 30 s)."""
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
        for key, (signal_steps, values) in (stored_series(timeline) if signals else {}).items():
            writer.add_series(key, signal_steps, values)  # one batch per signal
        writer.add_findings(kept)
        for decision in result.decisions:
            writer.add_decision(decision)


def stored_series(timeline: Timeline) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each scalar signal's (steps, values) as the log's run store holds them, in step order: a restarted log as
    its store would be after a resume, the rows from each restart's step on those of the later stretch (what
    `keel.store.RunWriter.drop_from` leaves). Per-parameter families are not stored, nor a signal none of whose
    values is kept (logged only in a stretch a restart replaced, or never).

    Example:
        >>> from keel.doctor import build_timeline
        >>> from keel.doctor.log import RawLog
        >>> log = RawLog(source="x", format="csv", records=[(0, {"loss": 3.0}), (1, {"loss": 2.0}), (1, {"loss": 2.5})])
        >>> steps, values = stored_series(build_timeline(log))["loss"]
        >>> steps.tolist(), values.tolist()
        ([0, 1], [3.0, 2.5])
    """
    kept = _kept_observations(timeline.steps)
    series = {}
    for key, column in timeline.signals.items():
        rows = kept[column.rows]
        if rows.any():  # a signal with no row kept is not in the store at all
            series[key] = (timeline.steps[column.rows[rows]], column.values[rows])
    return series


def _kept_observations(steps: np.ndarray) -> np.ndarray:
    """Which observations a store keeps: those whose step is below every later restart's (a restart at step s drops
    the rows of steps >= s written before it). The kept steps are increasing."""
    later_restart = np.full(len(steps), np.iinfo(np.int64).max, dtype=np.int64)
    restart = np.flatnonzero(steps[1:] <= steps[:-1]) + 1
    later_restart[restart - 1] = steps[restart]  # observation i sees the restart right after it ...
    suffix = np.minimum.accumulate(later_restart[::-1])[::-1]  # ... and every one later
    return steps < suffix


def _abandoned(finding: Finding, restarts: list[int]) -> bool:
    """Whether a later stretch restarted at or before the finding's step: its rows replaced the finding's stretch's
    there (`keel.doctor.examine` numbers the stretches after a restart in the ``segment`` evidence)."""
    segment = int(finding.evidence.get("segment", 0))
    return any(start <= finding.step for start in restarts[segment:])
