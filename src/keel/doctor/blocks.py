"""Detectors over a stretch of a log at once: what `update` per step finds, at a fraction of the cost.

`keel doctor`'s driver cuts a log into stretches of consecutive observations with increasing steps (cut at
restarts, rollbacks and checkpoints) and hands each stretch to `advance`, which gives every detector only
the work its contract allows (`keel.detect.scan`):

- a `SignalScan` detector scans its signal's values over the stretch (skipped when the log lacks the signal);
- a `ReadsKeys` detector reads only the observations that log one of its keys; with ``rests_when_finite``
  only those with a non-finite value among them, plus the last observation of each quiet run between (any
  one of them leaves it at rest);
- any other detector reads every observation.

Findings come back in the order the per-step loop gives them: by step, then by detector. A detector that
raises is switched off from that step on, with a ``keel_error`` finding, as in the per-step loop; a scan
that raises is read again step by step from where the stretch began, to find that step.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from keel._core.finding import Finding
from keel._core.observation import Observation
from keel.detect import Detector
from keel.detect.scan import ReadsKeys, SignalScan
from keel.doctor.table import Column
from keel.doctor.timeline import Timeline

SCAN, REST, SPARSE, EVERY, IDLE = "scan", "rest", "sparse", "every", "idle"


@dataclass
class Broken:
    """Detectors switched off (by position), each with when (for ordering) and why."""

    notes: dict[int, tuple[tuple[int, int], str]] = field(default_factory=dict)
    stretch: int = 0  # stretches advanced so far: orders the notes across rewinds

    def __contains__(self, index: int) -> bool:
        return index in self.notes

    def add(self, index: int, step: int, note: str) -> None:
        self.notes[index] = ((self.stretch, step), note)

    def in_order(self) -> list[str]:
        return [note for _, note in sorted(self.notes.values())]


class Plan:
    """What each detector needs from a timeline: a scan's series, or the observations it must read.

    Built once per log from the detectors' types and settings, which every fresh detector list repeats.
    """

    def __init__(self, detectors: Sequence[Detector], timeline: Timeline) -> None:
        self.timeline = timeline
        self.modes: list[str] = []
        self.series: dict[int, np.ndarray] = {}  # a scanned signal's values by observation (NaN: not logged)
        self.rows: dict[int, np.ndarray] = {}  # the observations a detector must read (sorted)
        n = len(timeline)
        for i, det in enumerate(detectors):
            if isinstance(det, SignalScan) and isinstance(getattr(det.config, "signal", None), str):
                col = timeline.signals.get(det.config.signal)
                if col is None:
                    self.modes.append(IDLE)  # all NaN: a scan changes nothing
                    continue
                self.modes.append(SCAN)
                self.series[i] = _series(col, n)
            elif isinstance(det, ReadsKeys):
                logged, non_finite = _rows_of(timeline, det.reads)
                rests = det.rests_when_finite is True
                self.modes.append(REST if rests else SPARSE if len(logged) else IDLE)
                self.rows[i] = non_finite if rests else logged
            else:
                self.modes.append(EVERY)


def _series(col: Column, count: int) -> np.ndarray:
    """A signal's values by observation, NaN where not logged; a signal logged at every observation is read from
    its column as it is (read-only), not copied for each detector that scans it."""
    if len(col.rows) == count:
        values = col.values.view()
        values.flags.writeable = False
        return values
    values = np.full(count, np.nan)
    values[col.rows] = col.values
    return values


def advance(detectors: list[Detector], plan: Plan, first: int, stop: int, broken: Broken) -> list[Finding]:
    """Feed observations [first, stop) — steps increasing — to ``detectors``; their findings, in step order.

    Each detector ends in the state its ``update`` step by step would leave it in.
    """
    broken.stretch += 1
    timeline = plan.timeline
    steps = timeline.steps[first:stop]
    tagged: list[tuple[int, int, Finding]] = []  # (step, detector, finding)
    reads: dict[int, np.ndarray] = {}
    for i, (det, mode) in enumerate(zip(detectors, plan.modes, strict=True)):
        if i in broken or mode == IDLE:
            continue
        if mode == SCAN:
            tagged += ((f.step, i, f) for f in _scan(det, i, steps, plan.series[i][first:stop], plan, first, broken))
        elif mode == EVERY:
            reads[i] = np.arange(first, stop)
        else:
            rows = plan.rows[i]
            a, b = np.searchsorted(rows, (first, stop)).tolist()
            reads[i] = rows[a:b] if mode == SPARSE else _with_rest(rows[a:b], first, stop)
    if reads:
        tagged += ((f.step, i, f) for i, f in _read(detectors, reads, timeline, broken))
    tagged.sort(key=lambda t: t[:2])  # stable: a detector's own findings keep their order
    return [f for _, _, f in tagged]


def _scan(
    det: Detector, index: int, steps: np.ndarray, values: np.ndarray, plan: Plan, first: int, broken: Broken
) -> list[Finding]:
    try:
        state = det.state_dict()
    except Exception as exc:  # noqa: BLE001 - as a checkpoint's state_dict (see keel.doctor.examine)
        broken.add(
            index,
            int(steps[0]),
            f"the {label(det)} detector's state_dict raised {type(exc).__name__}; it was switched off",
        )
        return []
    try:
        return det.scan(steps, values)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - read again step by step: update names the step, or the scan was wrong
        det.load_state_dict(state)
        rows = np.arange(first, first + len(steps))
        return [f for _, f in _read([det], {0: rows}, plan.timeline, broken, offset=index)]


def _read(
    detectors: list[Detector], reads: dict[int, np.ndarray], timeline: Timeline, broken: Broken, offset: int = 0
) -> Iterator[tuple[int, Finding]]:
    """``update`` of each detector in ``reads`` on its observations, in order: (detector, finding) pairs."""
    wanted = np.unique(np.concatenate(list(reads.values())))
    marks = {i: np.isin(wanted, rows, assume_unique=True).tolist() for i, rows in reads.items()}
    for k, obs in enumerate(_observations(timeline, wanted)):
        for i, mark in marks.items():
            if not mark[k] or i + offset in broken:
                continue
            try:
                found = detectors[i].update(obs)
            except Exception as exc:  # noqa: BLE001 - any bug in a detector, reported as one
                yield i + offset, keel_error(detectors[i], obs.step, exc)
                broken.add(
                    i + offset,
                    obs.step,
                    f"the {label(detectors[i])} detector raised {type(exc).__name__} "
                    f"at step {obs.step} and was switched off for the rest of the log",
                )
                continue
            for f in found:
                yield i + offset, f


def _observations(timeline: Timeline, rows: np.ndarray) -> Iterator[Observation]:
    """The observations at ``rows`` (sorted), made a run of consecutive ones at a time."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        if len(run):
            yield from timeline.iter_observations(int(run[0]), int(run[-1]) + 1)


def _with_rest(non_finite: np.ndarray, first: int, stop: int) -> np.ndarray:
    """The non-finite observations in [first, stop) and the last of each quiet run between and after them."""
    quiet_ends = np.concatenate([non_finite - 1, [stop - 1]])
    quiet_ends = quiet_ends[quiet_ends >= first]
    quiet_ends = np.setdiff1d(quiet_ends, non_finite, assume_unique=False)
    return np.union1d(non_finite, quiet_ends)


def _rows_of(timeline: Timeline, reads: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The observations logging any of ``reads`` (keys, and families ending in "/"), and those logging a
    non-finite value among them."""
    columns = [timeline.signals[key] for key in reads if key in timeline.signals]
    columns += [col for key in reads if key.endswith("/") for _, col in timeline.members.get(key, ())]
    # a family of plain value keys (eval/<name>…) is read through its members' own columns
    columns += [col for key in reads if key.endswith("/") for k, col in timeline.signals.items() if k.startswith(key)]
    if len(columns) == 1:  # its rows as they are (a dense log's: the table's one shared array), not a copy
        col = columns[0]
        return col.rows, col.rows[~np.isfinite(col.values)]
    logged, non_finite = np.zeros(len(timeline), dtype=bool), np.zeros(len(timeline), dtype=bool)
    for col in columns:
        logged[col.rows] = True
        non_finite[col.rows[~np.isfinite(col.values)]] = True
    return np.flatnonzero(logged), np.flatnonzero(non_finite)


def label(det: Detector) -> str:
    signal = getattr(getattr(det, "config", None), "signal", None)
    return f"{det.name!r}" + (f" ({signal})" if signal else "")


def keel_error(det: Detector, step: int, exc: BaseException) -> Finding:
    return Finding(
        step=step,
        kind="keel_error",
        severity="warning",
        signal=det.name,
        evidence={
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8)),
        },
        cause=f"keel's {label(det)} detector raised {type(exc).__name__}: {exc}. It is switched off "
        "for the rest of this log; the other detectors went on.",
        advice="Please report this as a keel bug with the traceback (keel doctor --json shows it).",
    )
