"""The human-readable form of a `DoctorResult`: a findings table, then what was read and what was not."""

from __future__ import annotations

import math
import re
import shutil
import textwrap
from dataclasses import replace
from typing import Any

from keel._core.decision import Decision
from keel._core.finding import SEVERITIES, Finding
from keel._core.printable import printable, printable_tree
from keel.doctor.result import DoctorResult, actions_of

MAX_ROWS = 50  # findings printed in full; the rest are counted
_NUMBERS = re.compile(r"[-+]?\d[\d.,eE+-]*")  # the numbers of a cause, which differ between repeats of one finding


def format_result(result: DoctorResult, *, min_severity: str = "warning") -> str:
    """The findings at or above ``min_severity`` as a table with cause and advice, then the summary.

    Findings below it are counted by kind, with their first steps, so a healthy run's one-batch outliers
    are visible without burying an alarm. Every string that came from the log (column names, tags, a
    store's recorded causes) is shown with its control characters escaped (`printable`).
    """
    result = _printable(result)
    width = max(80, min(shutil.get_terminal_size((110, 24)).columns, 140))
    s = result.summary
    lines = [
        f"keel doctor: {result.source} ({result.format}, {s.get('observations', 0)} steps "
        f"{s.get('first_step')}–{s.get('last_step')}, logged every {s.get('stride', 1)})"
    ]
    lines += _ended_lines(s.get("meta", {}).get("status"), width)
    shown = result.at_least(min_severity)
    lines.append("")
    if shown:
        lines += _table(shown[:MAX_ROWS], width)
        if len(shown) > MAX_ROWS:
            lines.append(f"… and {len(shown) - MAX_ROWS} more (use --json for all)")
    else:
        lines.append(f"no findings at {min_severity} or above.")
    quiet = [f for f in result.findings if f not in shown]
    if quiet:
        lines.append("")
        lines.append("below the table (use --all to list):")
        for kind, group in _by_kind(quiet).items():
            steps = ", ".join(str(f.step) for f in group[:8]) + (" …" if len(group) > 8 else "")
            severities = "/".join(sorted({f.severity for f in group}, key=SEVERITIES.index))
            lines.append(f"  {len(group):>4} {kind} ({severities}) at steps {steps}")
    lines += _diagnosis_lines(s, width)
    lines += _decision_lines(result.decisions, s, width)
    lines.append("")
    lines += _summary_lines(s)
    counts = s.get("counts", {})
    lines.append(
        f"findings: {counts.get('critical', 0)} critical, {counts.get('warning', 0)} warning, "
        f"{counts.get('info', 0)} info"
    )
    return "\n".join(lines)


def _printable(result: DoctorResult) -> DoctorResult:
    findings = [
        replace(
            f,
            kind=printable(f.kind),
            signal=printable(f.signal),
            cause=printable(f.cause),
            advice=printable(f.advice),
            evidence=printable_tree(f.evidence),
        )
        for f in result.findings
    ]
    decisions = [replace(d, reason=printable(d.reason)) for d in result.decisions]
    return DoctorResult(
        source=printable(result.source),
        format=result.format,
        findings=findings,
        summary=printable_tree(result.summary),
        decisions=decisions,
    )


def _table(findings: list[Finding], width: int) -> list[str]:
    header = f"{'step':>8}  {'severity':<8}  {'kind':<22}  {'signal':<10}  {'value':>10}  {'baseline':>10}"
    lines = [header + "  evidence", "-" * min(width, 110)]
    wrap = textwrap.TextWrapper(width=width - 10, initial_indent=" " * 10, subsequent_indent=" " * 18)
    previous: tuple[str, str, str] | None = None
    noted = False
    for f in findings:
        lines.append(
            f"{f.step:>8}  {f.severity:<8}  {f.kind:<22}  {f.signal:<10}  {_num(f.value):>10}  "
            f"{_num(f.baseline):>10}  {_evidence(f.evidence)}"
        )
        # A run of one kind repeats its cause (only the numbers differ; the row shows them) and its advice:
        # a store of 40 consecutive critical spikes printed 40 identical blocks. Print them once per run.
        said = (f.kind, _NUMBERS.sub("#", f.cause), f.advice)
        if said == previous:
            if not noted and (f.cause or f.advice):  # the first repeat of this run: say so, once
                lines.append(" " * 10 + "cause and advice as above")
                noted = True
            continue
        previous, noted = said, False
        if f.cause:
            lines += wrap.wrap("cause:  " + f.cause)
        if f.advice:
            lines += wrap.wrap("advice: " + f.advice)
    return lines


def _ended_lines(status: Any, width: int) -> list[str]:
    """How a run store's run ended, when it did not finish (`keel.guard.run_end` records it)."""
    if not isinstance(status, str) or status == "finished":
        return []
    if status.startswith("interrupted by "):
        said = f"the run was {status} (preempted or stopped: resume=True continues it from its newest disk snapshot)"
    elif status == "running":
        said = (
            "the run's status is 'running': it is still running, or its process was killed (SIGKILL, the OOM "
            "killer, a crash) before keel could record how it ended; its last rows, up to 0.5 s of steps, may be "
            "missing"
        )
    else:
        said = f"the run ended: {status}"
    return textwrap.wrap(said, width=width, subsequent_indent="  ")


def _diagnosis_lines(s: dict[str, Any], width: int) -> list[str]:
    """The named causes, most likely first: the Guard's own (with lead times) for a run store, else the
    diagnosis of the findings above."""
    recorded = s.get("meta", {}).get("diagnosis")
    diagnoses = recorded if recorded else s.get("diagnosis", [])
    if not diagnoses:
        return []
    wrap = textwrap.TextWrapper(width=width - 2, initial_indent="  ", subsequent_indent="     ")
    lines = ["", "diagnosis" + (" (recorded by the Guard at the end of the run):" if recorded else ":")]
    for i, d in enumerate(diagnoses, 1):
        lines += wrap.wrap(f"{i}. {d['summary']}")
    return lines


def _decision_lines(decisions: list[Decision], s: dict[str, Any], width: int) -> list[str]:
    """What the Guard did (a run store), or the trainer itself (a log that records its own skips): its skips by
    step, each rollback with the actions it applied and what triggered it, each abort with its reason."""
    if "decisions" not in s:
        return []
    counts = ", ".join(f"{n} {action}" for action, n in s["decisions"].items())
    recorder = "the Guard" if s.get("format") == "keel_store" else "the log"
    lines = ["", f"decisions recorded by {recorder}: {counts or 'none (no step was skipped or rolled back)'}"]
    wrap = textwrap.TextWrapper(width=width - 2, initial_indent="  ", subsequent_indent="     ")
    for by, who in (("keel", ""), ("scaler", " by the GradScaler"), ("trainer", " by the trainer itself")):
        steps = [d.step for d in decisions if d.action == "skip" and d.by == by]
        if steps:
            listed = ", ".join(map(str, steps[:12])) + (f" … ({len(steps)} in all)" if len(steps) > 12 else "")
            lines += wrap.wrap(f"skip{who} at steps {listed}")
    acts = [d for d in decisions if d.action in ("rollback", "abort")]
    for d in acts[:MAX_ROWS]:
        if d.action == "rollback":
            trigger = d.reason.partition("Trigger: ")[2] or d.reason
            began = f" ({d.began()})" if d.onset is not None else ""
            lines += wrap.wrap(
                f"rollback at step {d.step} to the snapshot of step {d.restored_step}{began}; "
                f"actions: {', '.join(actions_of(d)) or 'none'}; trigger: {trigger}"
            )
        else:
            lines += wrap.wrap(f"abort at step {d.step}: {d.reason}")
    if len(acts) > MAX_ROWS:
        lines.append(f"  … and {len(acts) - MAX_ROWS} more rollbacks and aborts (use --json for all)")
    return lines


def _summary_lines(s: dict[str, Any]) -> list[str]:
    lines = []
    signals = s.get("signals", {})
    if signals:
        parts = []
        for key, info in list(signals.items())[:10]:
            column = f" ← {info['column']}" if info["column"] != key else ""
            bad = f", {info['non_finite']} non-finite" if info["non_finite"] else ""
            parts.append(f"{key}{column} ({info['observations']}{bad})")
        more = f" and {len(signals) - 10} more" if len(signals) > 10 else ""
        lines.append("signals: " + "; ".join(parts) + more)
    if s.get("text_columns"):
        lines.append("left out (text): " + ", ".join(s["text_columns"]))
    for what in ("gaps", "restarts"):
        block = s.get(what, {})
        if block.get("count"):
            first = block["listed"][0]
            where = ", ".join(f"{k} {v}" for k, v in first.items())
            lines.append(f"{what}: {block['count']} (first: {where})")
    idle: dict[str, list[str]] = {}  # a signal the log lacks → the detectors it leaves idle: said once
    for det in s.get("detectors", []):
        if "needs" in det and det["observations"] == 0:
            idle.setdefault(det["signal"], []).append(det.get("kind", det["name"]))
    for signal, kinds in idle.items():
        lines.append(f"{signal} is not in this log: no {' or '.join(kinds)} detection")
    for det in s.get("detectors", []):
        if "needs" in det and det["observations"] == 0:
            continue
        if "needs" in det and det.get("armed_at_step") is None:
            kind = f"{det.get('kind', det['name'])} on {det['signal']}: {det['observations']} value(s)"
            if det.get("extreme_from_step") is not None:
                lines.append(
                    f"short history for {kind}: only jumps to {det['extreme_factor']:g}x the median so far are "
                    f"flagged until it has {det['needs']}"
                )
            else:
                lines.append(f"not enough history for {kind}, it needs {det['needs']} before it can flag anything")
    if s.get("phases"):
        lines.append(
            "phases (the loss and grad-norm baselines restart at each switch, as the Guard's did): "
            + "; ".join(
                f"{p['index']} {p['name']!r} from step {p['step']}"
                + (f" (stability gap: {', '.join(p['stability_gaps'])})" if p["stability_gaps"] else "")
                for p in s["phases"]
            )
        )
    for note in s.get("notes", []):
        lines.append(f"note: {note}")
    if "stored_findings" in s:
        st = s["stored_findings"]
        lines.append(
            f"recorded live by the Guard: {st['critical']} critical, {st['warning']} warning, {st['info']} info"
        )
    return lines


def _by_kind(findings: list[Finding]) -> dict[str, list[Finding]]:
    grouped: dict[str, list[Finding]] = {}
    for f in findings:
        grouped.setdefault(f.kind, []).append(f)
    return grouped


def _num(x: float) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return f"{x:.4g}"


def _evidence(evidence: dict[str, Any]) -> str:
    parts = []
    for key, value in evidence.items():
        if key in ("advice", "traceback") or isinstance(value, (dict, list)) and len(str(value)) > 60:
            continue
        parts.append(f"{key}={_num(value) if isinstance(value, float) else value}")
    return " ".join(parts)
