"""The summary a run says when it closes: its findings by kind and severity, what keel did, the named cause, and
where its store and report are (`keel.guard.console` says it on the ``keel`` logger)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from keel._core.decision import Decision
from keel._core.finding import Finding
from keel._core.printable import one_line
from keel.detect.diagnosis import Diagnosis
from keel.store.schema import STORE_NAME

# the log level of a finding's line, by severity
LEVELS = {"info": logging.DEBUG, "warning": logging.WARNING, "critical": logging.ERROR}


def format_summary(
    *,
    status: str,
    steps: int,
    policy: str | None,
    findings: Sequence[Finding],
    decisions: Sequence[Decision],
    diagnoses: Sequence[Diagnosis],
    run_dir: str | None,
    hidden: int = 0,
    failures: Mapping[str, int] | None = None,
) -> str:
    """The close summary: counts by kind and severity, what keel did, the named cause, the store and the report.

    ``failures``: how many steps each of keel's own parts that is tried again on the next step (``guard``: the
    whole step's checks) failed on; its ``keel_error`` finding said only the first, and those steps went unguarded.
    """
    lines = [f"run {one_line(status, 200)} after {steps} steps" + (f" (policy {policy})" if policy else "")]
    kinds: dict[str, Counter[str]] = {}
    for f in findings:
        kinds.setdefault(f.kind, Counter())[f.severity] += 1
    serious = any(c["warning"] or c["critical"] for c in kinds.values())
    if kinds:
        lines.append(
            "  findings: "
            + "; ".join(
                f"{one_line(str(kind), 60)} {sum(c.values())} ("
                + ", ".join(f"{s} {c[s]}" for s in LEVELS if c[s])
                + ")"
                for kind, c in sorted(kinds.items(), key=lambda kc: (-_worst(kc[1]), kc[0]))
            )
        )
    if not serious:
        lines.append("  no warning or critical finding")
    lines.append("  decisions: " + _decisions(decisions))
    for i, d in enumerate(diagnoses[:3], 1):
        top = d.advice[0]["action"] if d.advice else ""
        advice = f"; advice: {one_line(advice_in_force(str(top), policy), 200)}" if top else ""
        lines.append(f"  cause {i}: {one_line(str(d.title), 100)} ({d.when()}){advice}")
    for component, times in sorted((failures or {}).items()):
        lines.append(
            f"  keel error: {one_line(component, 60)} failed on {times} {plural(times, 'step')}; "
            f"{'that step' if times == 1 else 'those steps'} went on unguarded, as the bare loop would "
            "(the keel_error finding has the first traceback)"
        )
    if hidden:
        lines.append(f"  {hidden} {plural(hidden, 'line')} not shown on the console (rate limit)")
    if run_dir is not None:
        lines.append(f"  store: {one_line(str(Path(run_dir) / STORE_NAME))}; report: keel report {one_line(run_dir)}")
    else:
        lines.append(
            "  store: none (run_dir=None): the findings and decisions are in guard.findings and guard.decisions"
        )
    return "\n".join(lines)


# the policies that do what advice naming ``policy='…'`` asks for: recover skips too
_DONE_UNDER = {"skip": ("skip", "recover"), "recover": ("recover",)}


def advice_in_force(advice: str, policy: str | None) -> str:
    """The advice as the run under ``policy`` reads it: a ``(policy='skip')`` that the run's policy already carries
    out (``skip`` or ``recover``) becomes ``(keel does so under policy='recover')``; a policy the run lacks stays
    named, as advice to use it.

    Example:
        >>> advice_in_force("Skip this update (policy='skip').", "recover")
        "Skip this update (keel does so under policy='recover')."
    """
    for named, done_under in _DONE_UNDER.items():
        if policy in done_under:
            advice = advice.replace(f"(policy='{named}')", f"(keel does so under policy='{policy}')")
    return advice


def _worst(severities: Counter[str]) -> int:
    return max(LEVELS[s] for s in severities)


def _decisions(decisions: Sequence[Decision]) -> str:
    skips = sum(d.action == "skip" and d.by == "keel" for d in decisions)
    scaler = sum(d.action == "skip" and d.by == "scaler" for d in decisions)
    rollbacks = [d for d in decisions if d.action == "rollback"]
    aborts = sum(d.action == "abort" for d in decisions)
    parts = [plural(skips, "skip", count=True)]
    moved = ", ".join(f"step {d.step} → step {d.restored_step}" for d in rollbacks[:5] if d.restored_step is not None)
    more = ", …" if len(rollbacks) > 5 else ""
    parts.append(plural(len(rollbacks), "rollback", count=True) + (f" ({moved}{more})" if moved else ""))
    parts.append(plural(aborts, "abort", count=True))
    if scaler:
        parts.append(plural(scaler, "GradScaler overflow skip", count=True))
    return ", ".join(parts)


def plural(n: int, word: str, *, count: bool = False) -> str:
    word = word if n == 1 else f"{word}s"
    return f"{n} {word}" if count else word
