"""DoctorResult: the findings on one log and a summary of what was read, as a program or a person needs it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from keel._core.decision import Decision
from keel._core.finding import SEVERITIES, Finding, severity_rank

# How a rollback's reason names the actions it applied (keel.recover's actuator writes "…; actions: LR × 0.5
# from now on, optimizer moments reset. Trigger: …"); "none needed" when it applied none. Stores written before
# keel called them actions say "remedies: …" instead, and are read the same.
_ACTIONS = re.compile(r"; (?:actions|remedies): (.*?)\. Trigger: ")


@dataclass(kw_only=True)
class DoctorResult:
    """What `keel.doctor.examine_log` found.

    Attributes:
        source: The path read.
        format: The reader used (one of `keel.doctor.FORMATS`).
        findings: Every finding, info included, in the order the log was read.
        summary: What was read and how: steps, logging stride, gaps, restarts, the columns each signal came
            from, columns left out, when each detector had enough history to flag anything, counts (of the
            decisions too, for a run store).
        decisions: What the Guard did, as its run store recorded it: every skip, rollback and abort.
    """

    source: str
    format: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def at_least(self, severity: str) -> list[Finding]:
        """The findings of ``severity`` or worse."""
        floor = severity_rank(severity)
        return [f for f in self.findings if severity_rank(f.severity) >= floor]

    def worst(self) -> str | None:
        """The most severe finding's severity, or None without findings."""
        ranks = [severity_rank(f.severity) for f in self.findings]
        return SEVERITIES[max(ranks)] if ranks else None

    def to_dict(self) -> dict[str, Any]:
        """``{"source", "format", "findings": [...], "decisions": [...], "summary": {...}}``, JSON-ready.

        Each finding has step, kind, severity, signal, value, baseline, cause, advice and evidence;
        non-finite numbers become ``null``. Each decision has step, action, by, reason, onset, restored_step
        and actions (those a rollback applied, in words; see `actions_of`).
        """
        return {
            "source": self.source,
            "format": self.format,
            "findings": [_finding_dict(f) for f in self.findings],
            "decisions": [_decision_dict(d) for d in self.decisions],
            "summary": _clean(self.summary),
        }


def actions_of(decision: Decision) -> list[str]:
    """The actions a rollback applied, as its reason names them (``["LR × 0.1 from now on"]``); [] for
    anything else, or a reason that does not name them.

    Example:
        >>> actions_of(Decision(step=9, action="rollback", reason="rolled back to the snapshot of step 5; "
        ...                     "actions: LR × 0.5 from now on, optimizer moments reset. Trigger: divergence"))
        ['LR × 0.5 from now on', 'optimizer moments reset']
    """
    match = _ACTIONS.search(decision.reason) if decision.action == "rollback" else None
    if match is None or match.group(1) == "none needed":
        return []
    return match.group(1).split(", ")


def _decision_dict(d: Decision) -> dict[str, Any]:
    return {
        "step": d.step,
        "action": d.action,
        "by": d.by,
        "reason": d.reason,
        "onset": d.onset,
        "restored_step": d.restored_step,
        "actions": actions_of(d),
    }


def _finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "step": f.step,
        "kind": f.kind,
        "severity": f.severity,
        "signal": f.signal,
        "value": _number(f.value),
        "baseline": _number(f.baseline),
        "cause": f.cause,
        "advice": f.advice,
        "evidence": _clean(f.evidence),
    }


def _number(x: float) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
