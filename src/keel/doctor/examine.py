"""Run the Guard's own detectors over a log: the offline half of keel's detect layer.

The detectors are `keel.detect.default_detectors()` — the very objects a `Guard` runs live — fed one
`Observation` per logged step; a log with preference (``pref/…``) or RL (``rl/…``, ``rm/…``) signals, such as a TRL
trainer's (`keel.doctor.columns`), also gets `keel.detect.preference_detectors()` or `policy_detectors()`.

**Sparse logs.** A log written every k steps gives the detectors one observation per k steps, and their
windows count observations, not steps. keel keeps it that way for every setting that is a *sample count*:
a spike's robust baseline (``window``, ``min_history``) needs that many values whatever their spacing, and
``patience``/``rebase_after`` count consecutive elevated values — k steps apart they are stronger evidence
of persistence, not weaker, so scaling them down would turn single outliers into warnings. The one setting
that means *training steps* is the divergence detector's ``min_history`` ("the loss falls fast early on"):
it is divided by the logging stride k (at least its ``short`` median window), so a Trainer log with
``logging_steps=50`` is not blind to divergence for its first 2,500 steps.

**Restarts.** When a step repeats (a run resumed from a checkpoint logs those steps again), the detectors
are rewound to their state just before that step, as the Guard's are on a rollback, and the new segment is
read from there; findings of the abandoned stretch are kept, marked with their ``segment``. A keel run
store's recorded rollbacks are replayed the same way (the Guard restored its detectors with the snapshot),
so `keel doctor` on a store finds what the Guard found live.

**Speed.** Between restarts, rollbacks and checkpoints the detectors advance a stretch at a time
(`keel.doctor.blocks`): each does only the work its contract allows, and finds exactly what ``update`` step
by step finds. A million-step CSV takes about 3 s (BENCHMARKS.md, ``keel bench doctor --sizes``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from keel._core import keys
from keel._core.decision import ACTIONS
from keel._core.finding import SEVERITIES, Finding
from keel._core.observation import Observation
from keel.detect import (
    Detector,
    DivergenceDetector,
    SpikeDetector,
    default_detectors,
    policy_detectors,
    preference_detectors,
)
from keel.detect.diagnosis import diagnose, skipped_already
from keel.doctor._history import History
from keel.doctor.blocks import Broken, Plan, advance, label
from keel.doctor.formats import read_log
from keel.doctor.log import RawLog
from keel.doctor.overflows import skipped_overflows
from keel.doctor.phases import Declared, note_declared, rebaseline
from keel.doctor.result import DoctorResult
from keel.doctor.timeline import UNIT_LOSS_SCALE, Timeline, build_timeline, drop_unit_loss_scale

CHECKPOINT_EVERY = 4096  # observations between detector-state checkpoints; a stretch advances at most this many
RECENT_CHECKPOINTS = 16  # the newest checkpoints kept every CHECKPOINT_EVERY; older ones thin out (see _thin)
MAX_LISTED = 20  # gaps and restarts listed in the summary; the count covers the rest
GAP_FACTOR = 4  # a step difference over GAP_FACTOR × the logging stride is a gap


def examine_log(
    path: str | Path, *, format: str | None = None, detectors: Callable[[], Sequence[Detector]] | None = None
) -> DoctorResult:
    """Read a training log and run keel's detectors over it.

    Args:
        path: A CSV/TSV, JSONL, ``trainer_state.json``, TensorBoard event file or folder, or keel run store.
        format: Force a reader (see `keel.doctor.FORMATS`).
        detectors: Builds a fresh detector list; default `keel.detect.default_detectors`, plus the preference or
            RL presets when the log has their signals.

    Returns:
        The `DoctorResult`.

    Raises:
        LogReadError: The path is missing or not a usable log.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.csv"
        >>> rows = [f"{s},{2.0 + 0.01 * (s % 3)}" for s in range(40)] + ["40,nan"]
        >>> _ = p.write_text("step,loss\\n" + "\\n".join(rows) + "\\n")
        >>> [(f.step, f.kind, f.severity) for f in examine_log(p).findings]
        [(40, 'non_finite', 'critical')]
    """
    return examine(read_log(path, format), detectors=detectors)


def examine(
    log: RawLog,
    *,
    detectors: Callable[[], Sequence[Detector]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DoctorResult:
    """Run detectors over an already read `RawLog` (see `examine_log`).

    ``progress(done, total)`` is told how many of the log's observations the detectors have read, a stretch (at
    most `CHECKPOINT_EVERY`) at a time, ending with ``(total, total)``: `keel doctor`'s bar over a big log.
    """
    return examine_timeline(log, detectors=detectors, progress=progress)[0]


def examine_timeline(
    log: RawLog,
    *,
    detectors: Callable[[], Sequence[Detector]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[DoctorResult, Timeline]:
    """`examine`, and the `Timeline` the detectors read (the log's observations, as `keel.doctor.to_store` writes
    them)."""
    timeline = build_timeline(log)
    unit_scale = not log.keyed and drop_unit_loss_scale(timeline)  # a keel store's amp/scale is a real GradScaler's
    stride = _stride(timeline.steps)
    make = detectors or _defaults_for(timeline)
    declared = log.declared

    def fresh() -> list[Detector]:
        made = scale_for_stride(list(make()), stride)
        note_declared(made, declared)
        return made

    dets = fresh()
    plan = Plan(dets, timeline)
    steps = timeline.steps
    n = len(steps)
    crossings = _crossings(steps, declared)  # observations that come after a phase switch the one before did not
    # The current segment's history, steps strictly increasing: observation numbers and their steps (the
    # observations themselves are made again when a rewind replays them).
    kept = History(steps)
    broken = Broken()  # detectors that raised (by position): switched off for the rest of the log
    checkpoints: list[tuple[int, list[dict[str, Any] | None]]] = [(0, _states(dets, broken))]
    findings: list[Finding] = []
    restarts: list[dict[str, int]] = []

    def rewind(to_step: int) -> list[Detector]:
        """Detectors as they were at the start of ``to_step``; the history from there on is dropped."""
        keep = kept.bisect_left(to_step)
        while checkpoints[-1][0] > keep:
            checkpoints.pop()
        start, states = checkpoints[-1]
        rewound = fresh()
        for det, state in zip(rewound, states, strict=True):
            if state is not None:
                det.load_state_dict(state)
        kept.truncate(keep)
        position = start
        for first, stop in kept.runs_from(start):
            while first < stop:  # replay quietly: these findings were reported the first time
                end = min(stop, first + checkpoints[-1][0] + CHECKPOINT_EVERY - position, _next(crossings, first))
                if declared is not None and declared.crossed(
                    kept.step_at(position - 1) if position else None, int(steps[first])
                ):
                    rebaseline(rewound, broken, int(steps[first]))
                advance(rewound, plan, first, end, broken)
                position += end - first
                first = end
                if position - checkpoints[-1][0] >= CHECKPOINT_EVERY:  # the next rewind here replays less
                    checkpoints.append((position, _states(rewound, broken)))
        return rewound

    # Where a stretch must end: before a step not above the one before it (perhaps a restart), after a step the
    # Guard rolled back at, and before the first step of a declared phase (the baselines restart there).
    rollbacks = log.rollbacks
    rolled_back = np.fromiter(rollbacks, dtype=np.int64, count=len(rollbacks))
    cuts = np.union1d(np.flatnonzero(steps[1:] <= steps[:-1]) + 1, np.flatnonzero(np.isin(steps, rolled_back)) + 1)
    cuts = np.union1d(cuts, crossings)
    cuts = np.append(cuts[cuts < n], n)
    last = None  # the step of the newest kept observation
    index = 0
    while index < n:
        step = int(steps[index])
        if last is not None and step <= last:
            restarts.append({"step": step, "after_step": last})
            dets = rewind(step)
        if declared is not None and declared.crossed(kept.last_step(), step):
            rebaseline(dets, broken, step)  # a task switch: the loss and grad-norm baselines start afresh, as live
        stop = min(
            int(cuts[np.searchsorted(cuts, index, side="right")]),
            index + checkpoints[-1][0] + CHECKPOINT_EVERY - len(kept),
        )
        found = advance(dets, plan, index, stop, broken)
        if found:
            if restarts:
                found = [replace(f, evidence={**f.evidence, "segment": len(restarts)}) for f in found]
            findings += found
        kept.extend(index, stop)
        last = int(steps[stop - 1])
        index = stop
        if progress is not None:
            progress(index, n)
        if len(kept) - checkpoints[-1][0] >= CHECKPOINT_EVERY:
            checkpoints.append((len(kept), _states(dets, broken)))
            _thin(checkpoints)
        if last in rollbacks:
            # The Guard rolled back here: its detectors went back to their state at the start of the
            # restored step, and the run went on with the next step number.
            dets = rewind(rollbacks[last])
            last = kept.last_step()
    if log.format != "keel_store":  # a store's Guard skipped (or applied) such steps itself, and recorded why
        findings = skipped_overflows(findings, timeline)  # a log records no loss scale: keel.doctor.overflows
        findings = skipped_already(findings, log.decisions)  # spikes at steps the trainer skipped itself (OLMo-core)
    summary = _summary(log, timeline, stride, restarts, findings, fresh())
    summary["notes"] += ([UNIT_LOSS_SCALE] if unit_scale else []) + broken.in_order()
    result = DoctorResult(
        source=log.source, format=log.format, findings=findings, summary=summary, decisions=list(log.decisions)
    )
    return result, timeline


def _crossings(steps: np.ndarray, declared: Declared | None) -> np.ndarray:
    """The observations whose step is past a declared phase switch that the observation before's step is not
    (steps increasing between them)."""
    if declared is None or len(steps) < 2:
        return np.zeros(0, dtype=np.int64)
    passed = np.searchsorted(np.asarray(declared.switches, dtype=np.int64), steps, side="right")
    return np.flatnonzero((passed[1:] > passed[:-1]) & (steps[1:] > steps[:-1])) + 1


def _next(indices: np.ndarray, after: int) -> int:
    """The first of ``indices`` (increasing) above ``after``; a number past any observation when there is none."""
    at = int(np.searchsorted(indices, after, side="right"))
    return int(indices[at]) if at < len(indices) else np.iinfo(np.int64).max


def _defaults_for(timeline: Timeline) -> Callable[[], list[Detector]]:
    """`default_detectors`, plus the preset of each fine-tuning family the log has signals of.

    As `keel.integrations.trl.guard_trainer` picks them live: a preference log (DPOTrainer's) also logs the token
    entropy, ``rl/entropy``, which alone does not make it a policy-gradient run.
    """
    names = timeline.signals.keys()
    preference = any(name.startswith("pref/") for name in names)
    policy = any(name.startswith(("rl/", "rm/")) and not (preference and name == keys.RL_ENTROPY) for name in names)
    presets = [preset for preset, found in ((preference_detectors, preference), (policy_detectors, policy)) if found]
    return lambda: [*default_detectors(), *(d for preset in presets for d in preset())]


def _thin(checkpoints: list[tuple[int, list[dict[str, Any] | None]]]) -> None:
    """Drop old checkpoints so that their number grows with the log's logarithm, not its length.

    A checkpoint is the state of every detector (a window of values each): one per 256 observations held
    over 100 MB on a million-step log. The newest `RECENT_CHECKPOINTS` stay; older ones are kept every
    2, 4, 8 … × `CHECKPOINT_EVERY` observations as they age, so a rewind replays at most about an eighth of
    the way back it goes (a restart goes back a little, usually: those rewinds stay cheap). The first
    checkpoint, the detectors' fresh state, always stays.
    """
    newest = checkpoints[-1][0]
    keep = []
    for checkpoint in checkpoints:
        position = checkpoint[0]
        age = (newest - position) // CHECKPOINT_EVERY
        spacing = CHECKPOINT_EVERY << (age // RECENT_CHECKPOINTS).bit_length()
        if position == 0 or age < RECENT_CHECKPOINTS or position % spacing == 0:
            keep.append(checkpoint)
    checkpoints[:] = keep


def _states(detectors: list[Detector], broken: Broken) -> list[dict[str, Any] | None]:
    """Each working detector's state (None for one switched off, or whose ``state_dict`` raises)."""
    states: list[dict[str, Any] | None] = []
    for i, det in enumerate(detectors):
        try:
            states.append(None if i in broken else det.state_dict())
        except Exception as exc:  # noqa: BLE001 - a bug in a detector, as in keel.doctor.blocks
            broken.add(
                i, -1, f"the {label(det)} detector's state_dict raised {type(exc).__name__}; it was switched off"
            )
            states.append(None)
    return states


def logging_stride(observations: Sequence[Observation]) -> int:
    """The typical step spacing of the log: the median positive difference between consecutive steps (≥ 1).

    Example:
        >>> logging_stride([Observation(step=s) for s in (0, 10, 20, 30, 500, 510)])
        10
    """
    return _stride(np.array([o.step for o in observations], dtype=np.int64))


def _stride(steps: np.ndarray) -> int:
    diffs = np.diff(steps)
    diffs = diffs[diffs > 0]
    n = len(diffs)
    if not n:
        return 1
    low, high = (int(v) for v in np.partition(diffs, ((n - 1) // 2, n // 2))[[(n - 1) // 2, n // 2]])
    middle = high if n % 2 else (low + high) / 2  # statistics.median's value, exactly
    return max(1, round(middle))


def scale_for_stride(detectors: list[Detector], stride: int) -> list[Detector]:
    """Convert the step-denominated settings to observations for a log written every ``stride`` steps.

    Only `DivergenceDetector`'s ``min_history`` is in training steps; every other window is a sample count
    and stays as it is (see the module docstring).
    """
    if stride > 1:
        for det in detectors:
            if isinstance(det, DivergenceDetector):
                cfg = det.config
                det.config = replace(cfg, min_history=max(cfg.short, math.ceil(cfg.min_history / stride)))
    return detectors


def _summary(
    log: RawLog,
    timeline: Timeline,
    stride: int,
    restarts: list[dict[str, int]],
    findings: list[Finding],
    detectors: list[Detector],
) -> dict[str, Any]:
    steps = timeline.steps
    after = np.flatnonzero(np.diff(steps) > GAP_FACTOR * stride)
    gaps = [
        {"after_step": a, "next_step": b}
        for a, b in zip(steps[after[:MAX_LISTED]].tolist(), steps[after[:MAX_LISTED] + 1].tolist(), strict=True)
    ]
    signals = {
        key: {
            "column": timeline.columns.get(key, key),
            "observations": len(col.rows),
            "non_finite": int(np.count_nonzero(~np.isfinite(col.values))),
        }
        for key, col in timeline.signals.items()
    }
    counts = Counter(f.severity for f in findings)
    by_kind: dict[str, dict[str, int]] = {}
    for f in findings:
        by_kind.setdefault(f.kind, dict.fromkeys(SEVERITIES, 0))[f.severity] += 1
    summary: dict[str, Any] = {
        "format": log.format,
        "records": len(log.records),
        "observations": len(timeline),
        "first_step": int(steps.min()) if len(steps) else None,
        "last_step": int(steps.max()) if len(steps) else None,
        "stride": stride,
        "gaps": {"count": len(after), "listed": gaps},
        "restarts": {"count": len(restarts), "listed": restarts[:MAX_LISTED]},
        "signals": dict(sorted(signals.items(), key=lambda kv: (_rank(kv[0]), kv[0]))),
        "families": timeline.families,
        "text_columns": log.text_columns,
        "detectors": [_readiness(det, timeline) for det in detectors],
        "counts": {s: counts.get(s, 0) for s in SEVERITIES},
        "by_kind": by_kind,
        "notes": list(log.notes) + ([f"{timeline.merged} same-step record(s) merged"] if timeline.merged else []),
    }
    # the named causes (`keel.detect.diagnose`): cause, first sighting, evidence, advice with sources
    summary["diagnosis"] = [d.to_dict() for d in diagnose(findings)]
    if log.meta:
        summary["meta"] = log.meta
    if log.declared is not None:
        summary["phases"] = log.declared.summary(findings)
    if log.format == "keel_store":
        stored = Counter(f.severity for f in log.stored_findings)
        summary["stored_findings"] = {s: stored.get(s, 0) for s in SEVERITIES}
    if log.format == "keel_store" or log.decisions:  # a log's own skips (OLMo-core's SkipStepOptimizer)
        actions = Counter(d.action for d in log.decisions)
        summary["decisions"] = {a: actions[a] for a in ACTIONS if actions[a]}
    return summary


_PRIMARY = (keys.LOSS, keys.GRAD_NORM, keys.LR)


def _rank(key: str) -> int:
    return _PRIMARY.index(key) if key in _PRIMARY else len(_PRIMARY)


def _log_space(det: SpikeDetector, values: np.ndarray) -> bool:
    """Whether ``det`` judged ``values`` in log space (``log_scale=None``: while every value is positive)."""
    return det.config.log_scale is True or (det.config.log_scale is None and bool((values > 0).all()))


def _readiness(det: Detector, timeline: Timeline) -> dict[str, Any]:
    """When ``det`` first had enough history to flag anything in this log (None: never)."""
    info: dict[str, Any] = {"name": det.name}
    cfg = getattr(det, "config", None)
    signal = getattr(cfg, "signal", None)
    if signal is None:
        return info
    info.update(kind=getattr(cfg, "kind", det.name), signal=signal)
    if not isinstance(det, (SpikeDetector, DivergenceDetector)):
        return info  # other detectors' warm-up rules are their own; they say nothing until they can
    needed = det.config.min_history
    col = timeline.signals.get(signal)
    values = col.values if col is not None else np.zeros(0)
    usable_at = np.isfinite(values)
    if isinstance(det, DivergenceDetector):
        needed = max(needed, det.config.short)
        armed_index = needed - 1  # it may flag from the observation that completes its history
    else:
        if det.config.log_scale:
            usable_at &= values > 0
        armed_index = needed  # the spike detector compares the value after min_history accepted ones
    usable = timeline.steps[col.rows[usable_at]] if col is not None else np.zeros(0, dtype=np.int64)
    info.update(
        needs=needed,
        observations=len(usable),
        armed_at_step=int(usable[armed_index]) if len(usable) > armed_index else None,
    )
    if (
        isinstance(det, SpikeDetector)
        and info["armed_at_step"] is None
        and det.config.warmup_points < needed
        and _log_space(det, values[usable_at])
    ):
        # before its baseline it flags only extreme jumps over the values so far (`SpikeDetector._warm_up`)
        first = det.config.warmup_points
        info.update(
            extreme_from_step=int(usable[first]) if len(usable) > first else None,
            extreme_factor=1.0 + max(det.config.warmup_excess, det.config.min_excess),
        )
    return info
