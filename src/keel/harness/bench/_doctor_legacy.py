"""Frozen copy of `keel doctor`'s record-based path before the columnar rewrite: the baseline of `keel bench doctor`.

`keel bench doctor --sizes` runs it next to today's `keel.doctor` to measure the ratio, and the tests in
tests/doctor/test_columnar_equivalence.py check that the columnar path finds exactly what this one found. It is
today's code as it was (commit c03b3bc: `csv_log.read_csv_log`, `timeline.build_timeline`, `diagnose.diagnose`
and its summary), with imports adjusted and the doctor's functions named as today's (`examine`); nothing outside
the benchmark and those tests uses it. Do not fix it: its job is to stay what it was.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import Any

from keel._core import keys
from keel._core.finding import SEVERITIES, Finding
from keel._core.observation import Observation
from keel.detect import Detector, DivergenceDetector, SpikeDetector, default_detectors
from keel.detect.diagnosis import diagnose
from keel.doctor.columns import STEP_COLUMNS, find_step_column, map_columns
from keel.doctor.log import LogReadError
from keel.doctor.result import DoctorResult

CHECKPOINT_EVERY = 256
MAX_LISTED = 20
GAP_FACTOR = 4
NOT_FAMILIES = frozenset({keys.LR})


@dataclass(kw_only=True)
class RawLog:
    """The record-based RawLog of the old path: ``records`` is a list of ``(step, {column: value})``."""

    source: str
    format: str
    records: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    step_column: str = "step"
    text_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keyed: bool = False
    stored_findings: list[Finding] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    rollbacks: dict[int, int] = field(default_factory=dict)


def examine_csv(path: str | Path, *, detectors: Callable[[], Sequence[Detector]] | None = None) -> DoctorResult:
    """The old ``keel doctor`` on a CSV/TSV file: read it whole, then records, observations, detectors."""
    return examine(read_csv_log(path), detectors=detectors)


def parse_step(value: object) -> int | None:
    """An integral step from a cell or JSON value (``12``, ``"12"``, ``12.0``); None for anything else.

    Example:
        >>> parse_step("120"), parse_step(3.0), parse_step("2.5"), parse_step(""), parse_step(True)
        (120, 3, None, None, None)
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def parse_number(value: object) -> float | None:
    """A float from a cell or JSON value; ``"nan"``/``"inf"`` as written; None for text, bools and blanks.

    Example:
        >>> parse_number("2.5"), parse_number("nan"), parse_number(""), parse_number("ok"), parse_number(None)
        (2.5, nan, None, None, None)
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            return None
    return None


def read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM ignored); `LogReadError` when it is empty or not text."""
    data = path.read_bytes()
    if not data.strip():
        raise LogReadError(f"{path}: the file is empty")
    nul = data.find(b"\x00", 0, 65536)
    if nul >= 0:
        raise LogReadError(f"{path}: binary data (a NUL byte at offset {nul}), not a text log")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LogReadError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start})") from None


def read_csv_log(path: str | Path) -> RawLog:
    """Read a CSV/TSV training log.

    Args:
        path: The file.

    Returns:
        The `RawLog`, records in row order.

    Raises:
        LogReadError: Empty, not text, no header, no step column, or no data row with a step.
    """
    path = Path(path)
    text = read_text(path)
    rows = list(csv.reader(io.StringIO(text), dialect=_dialect(text)))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise LogReadError(f"{path}: the file is empty")
    header = [cell.strip() for cell in rows[0]]
    step_column = find_step_column(header)
    if step_column is None:
        raise LogReadError(
            f"{path}: no step column among {', '.join(header[:12]) or '(none)'}; "
            f"allowed names: {', '.join(STEP_COLUMNS)}"
        )
    body = rows[1:]
    if not body:
        raise LogReadError(f"{path}: a header but no data rows")
    step_index = header.index(step_column)
    log = RawLog(source=str(path), format="csv", step_column=step_column)
    numeric = []
    for i, name in enumerate(header):
        if i == step_index or not name:
            continue
        cells = [row[i].strip() for row in body if i < len(row) and row[i].strip()]
        parsed = sum(parse_number(c) is not None for c in cells)
        if cells and parsed * 2 < len(cells):
            log.text_columns.append(name)
        else:
            numeric.append((i, name))
    no_step = text_cells = 0
    for row in body:
        step = parse_step(row[step_index]) if step_index < len(row) else None
        if step is None:
            no_step += 1
            continue
        values: dict[str, float] = {}
        for i, name in numeric:
            cell = row[i] if i < len(row) else ""
            value = parse_number(cell)
            if value is not None:
                values[name] = value
            elif cell.strip():
                text_cells += 1
        log.records.append((step, values))
    if not log.records:
        raise LogReadError(f"{path}: no row has an integer in the step column {step_column!r}")
    if no_step:
        log.notes.append(f"{no_step} row(s) without an integer step were skipped")
    if text_cells:
        log.notes.append(f"{text_cells} text cell(s) in numeric columns were read as not logged")
    return log


def _dialect(text: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(text[:8192], delimiters=",\t;")
    except csv.Error:
        return csv.excel_tab if "\t" in text.partition("\n")[0] else csv.excel


@dataclass(kw_only=True)
class Timeline:
    """A log's observations in file order, and what was done to get them.

    Attributes:
        observations: One per logged step (a restarted stretch appears again, in file order).
        columns: Signal key → the log column it was read from (mapped columns only).
        families: Per-parameter families found (``grad/norm/`` ...).
        merged: Records merged into the step before them.
    """

    observations: list[Observation] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)
    families: list[str] = field(default_factory=list)
    merged: int = 0


def build_timeline(log: RawLog) -> Timeline:
    """Map, merge and split a `RawLog`'s records into observations.

    Example:
        >>> from keel.doctor.log import RawLog
        >>> records = [(10, {"train_loss": 2.0}), (10, {"eval_loss": 2.2}), (20, {"train_loss": 1.9})]
        >>> log = RawLog(source="x", format="jsonl", records=records)
        >>> [(o.step, o.values) for o in build_timeline(log).observations]
        [(10, {'loss': 2.0, 'val/loss': 2.2}), (20, {'loss': 1.9})]
    """
    names = list(dict.fromkeys(name for _, values in log.records for name in values))
    mapping = {name: name for name in names} if log.keyed else map_columns(names)
    families = _families(mapping.values())
    family_of = {key: _family_of(key, families) for key in mapping.values()}
    timeline = Timeline(columns={key: name for name, key in mapping.items() if key != name}, families=sorted(families))
    merged: list[tuple[int, dict[str, float]]] = []
    for step, values in log.records:
        values = {mapping[name]: value for name, value in values.items()}
        if merged and merged[-1][0] == step and _compatible(merged[-1][1], values):
            merged[-1][1].update(values)
            timeline.merged += 1
        else:
            merged.append((step, values))
    timeline.observations = [_observation(step, values, family_of) for step, values in merged]
    return timeline


def _compatible(a: dict[str, float], b: dict[str, float]) -> bool:
    # Same step, and every column both records hold has the same value (a Trainer repeats "epoch").
    return all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a.keys() & b.keys())


def _families(names: Iterable[str]) -> set[str]:
    names = set(names)
    found = set()
    for name in names:
        head, sep, _ = name.rpartition("/")
        while sep:
            if head in names and head not in NOT_FAMILIES:
                found.add(head + "/")
            head, sep, _ = head.rpartition("/")
    return found


def _observation(step: int, values: dict[str, float], family_of: dict[str, str | None]) -> Observation:
    if not any(family_of.get(key) for key in values):
        return Observation(step=step, values=values)
    scalars: dict[str, float] = {}
    grouped: dict[str, tuple[list[str], list[float]]] = {}
    for key, value in values.items():
        family = family_of.get(key)
        if family is None:
            scalars[key] = value
        else:
            names, vals = grouped.setdefault(family, ([], []))
            names.append(key[len(family) :])
            vals.append(value)
    per_param = {family: (tuple(names), vals) for family, (names, vals) in grouped.items()}
    return Observation(step=step, values=scalars, per_param=per_param)


def _family_of(key: str, families: set[str]) -> str | None:
    # The longest family that prefixes the key: grad/norm/ for grad/norm/fc1.weight.
    best = None
    for family in families:
        if key.startswith(family) and len(key) > len(family) and (best is None or len(family) > len(best)):
            best = family
    return best


def examine(log: RawLog, *, detectors: Callable[[], Sequence[Detector]] | None = None) -> DoctorResult:
    """Run detectors over an already read `RawLog` (see `examine_csv`)."""
    timeline = build_timeline(log)
    stride = logging_stride(timeline.observations)
    make = detectors or default_detectors

    def fresh() -> list[Detector]:
        return scale_for_stride(list(make()), stride)

    dets = fresh()
    kept: list[Observation] = []  # the current segment's history, steps strictly increasing
    checkpoints: list[tuple[int, list[dict[str, Any]]]] = [(0, [d.state_dict() for d in dets])]
    findings: list[Finding] = []
    restarts: list[dict[str, int]] = []

    def rewind(to_step: int) -> list[Detector]:
        """Detectors as they were at the start of ``to_step``; the history from there on is dropped."""
        keep = bisect.bisect_left([o.step for o in kept], to_step)
        while checkpoints[-1][0] > keep:
            checkpoints.pop()
        start, states = checkpoints[-1]
        rewound = fresh()
        for det, state in zip(rewound, states, strict=True):
            det.load_state_dict(state)
        del kept[keep:]
        for old in kept[start:]:
            for det in rewound:
                det.update(old)  # replay quietly: these findings were reported the first time
        return rewound

    for obs in timeline.observations:
        if kept and obs.step <= kept[-1].step:
            restarts.append({"step": obs.step, "after_step": kept[-1].step})
            dets = rewind(obs.step)
        found = [f for det in dets for f in det.update(obs)]
        if restarts:
            found = [replace(f, evidence={**f.evidence, "segment": len(restarts)}) for f in found]
        findings += found
        kept.append(obs)
        if len(kept) - checkpoints[-1][0] >= CHECKPOINT_EVERY:
            checkpoints.append((len(kept), [d.state_dict() for d in dets]))
        if obs.step in log.rollbacks:
            # The Guard rolled back here: its detectors went back to their state at the start of the
            # restored step, and the run went on with the next step number.
            dets = rewind(log.rollbacks[obs.step])
    summary = _summary(log, timeline, stride, restarts, findings, fresh())
    return DoctorResult(source=log.source, format=log.format, findings=findings, summary=summary)


def logging_stride(observations: Sequence[Observation]) -> int:
    """The typical step spacing of the log: the median positive difference between consecutive steps (≥ 1).

    Example:
        >>> logging_stride([Observation(step=s) for s in (0, 10, 20, 30, 500, 510)])
        10
    """
    diffs = [b.step - a.step for a, b in zip(observations, observations[1:], strict=False) if b.step > a.step]
    return max(1, round(median(diffs))) if diffs else 1


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
    obs = timeline.observations
    steps = [o.step for o in obs]
    gaps = [
        {"after_step": a, "next_step": b} for a, b in zip(steps, steps[1:], strict=False) if b - a > GAP_FACTOR * stride
    ]
    signals: dict[str, dict[str, Any]] = {}
    for o in obs:
        for key, value in o.values.items():
            entry = signals.setdefault(
                key, {"column": timeline.columns.get(key, key), "observations": 0, "non_finite": 0}
            )
            entry["observations"] += 1
            entry["non_finite"] += not math.isfinite(value)
    counts = Counter(f.severity for f in findings)
    by_kind: dict[str, dict[str, int]] = {}
    for f in findings:
        by_kind.setdefault(f.kind, dict.fromkeys(SEVERITIES, 0))[f.severity] += 1
    summary: dict[str, Any] = {
        "format": log.format,
        "records": len(log.records),
        "observations": len(obs),
        "first_step": min(steps) if steps else None,
        "last_step": max(steps) if steps else None,
        "stride": stride,
        "gaps": {"count": len(gaps), "listed": gaps[:MAX_LISTED]},
        "restarts": {"count": len(restarts), "listed": restarts[:MAX_LISTED]},
        "signals": dict(sorted(signals.items(), key=lambda kv: (_rank(kv[0]), kv[0]))),
        "families": timeline.families,
        "text_columns": log.text_columns,
        "detectors": [_readiness(det, obs) for det in detectors],
        "counts": {s: counts.get(s, 0) for s in SEVERITIES},
        "by_kind": by_kind,
        "notes": list(log.notes) + ([f"{timeline.merged} same-step record(s) merged"] if timeline.merged else []),
    }
    # the named causes (`keel.detect.diagnose`): cause, first sighting, evidence, advice with sources
    summary["diagnosis"] = [d.to_dict() for d in diagnose(findings)]
    if log.meta:
        summary["meta"] = log.meta
    if log.format == "keel_store":
        stored = Counter(f.severity for f in log.stored_findings)
        summary["stored_findings"] = {s: stored.get(s, 0) for s in SEVERITIES}
    return summary


_PRIMARY = (keys.LOSS, keys.GRAD_NORM, keys.LR)


def _rank(key: str) -> int:
    return _PRIMARY.index(key) if key in _PRIMARY else len(_PRIMARY)


def _readiness(det: Detector, observations: Sequence[Observation]) -> dict[str, Any]:
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
    if isinstance(det, DivergenceDetector):
        needed = max(needed, det.config.short)
        usable = [o.step for o in observations if math.isfinite(o.values.get(signal, math.nan))]
        armed_index = needed - 1  # it may flag from the observation that completes its history
    else:
        positive = isinstance(det, SpikeDetector) and det.config.log_scale
        usable = [
            o.step
            for o in observations
            if math.isfinite(x := o.values.get(signal, math.nan)) and (x > 0 or not positive)
        ]
        armed_index = needed  # the spike detector compares the value after min_history accepted ones
    info.update(
        needs=needed, observations=len(usable), armed_at_step=usable[armed_index] if len(usable) > armed_index else None
    )
    values = [o.values[signal] for o in observations if math.isfinite(o.values.get(signal, math.nan))]
    if (
        isinstance(det, SpikeDetector)
        and info["armed_at_step"] is None
        and det.config.warmup_points < needed
        and (det.config.log_scale is True or (det.config.log_scale is None and all(x > 0 for x in values)))
    ):
        first = det.config.warmup_points
        info.update(
            extreme_from_step=usable[first] if len(usable) > first else None,
            extreme_factor=1.0 + max(det.config.warmup_excess, det.config.min_excess),
        )
    return info
