"""A finding explained by the cause catalogue: what was measured, then the mechanism and advice of its kind."""

from __future__ import annotations

from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel.detect.causes import cause_for

# Findings a skipped update mends: the damage is confined to this step's gradients, or (an LR surge) to the update
# about to be applied with them; (a normalization-statistics jump) to the running statistics this step's forward
# changed, which a skip puts back (keel.recover.running_stats).
SKIPPABLE_KINDS = frozenset({"non_finite", "loss_spike", "grad_spike", "lr_surge", "norm_stats_jump"})


def skip_mends(finding: Finding) -> bool:
    """Whether leaving this step's update out mends what ``finding`` reports: not non-finite parameters, nor a level
    shift (`keel.detect.spike`: each of its steps is within the run's noise, the damage is in the weights)."""
    return (
        finding.kind in SKIPPABLE_KINDS
        and finding.signal != keys.PARAM_NORM
        and finding.evidence.get("level_shift") is not True
    )


def explained_finding(
    *,
    step: int,
    kind: str,
    severity: Severity,
    signal: str,
    value: float,
    baseline: float,
    evidence: dict[str, Any],
    text: str,
) -> Finding:
    """A `Finding` whose ``text`` (what the detector measured, as sentences) the catalogue entry of ``kind`` explains.

    The entry's mechanism follows the text in ``cause``, its top three pieces of advice make ``advice``, and the
    whole ranked list joins the evidence, last, as ``advice``, so the store, the CLI and the report say the same;
    a kind without an entry keeps the text alone.

    Example:
        >>> f = explained_finding(step=9, kind="softmax_collapse", severity="critical", signal="softmax/collapse",
        ...                       value=0.7, baseline=0.01, evidence={"fraction": 0.7}, text="70% are one-hot.")
        >>> f.cause.startswith("70% are one-hot. Rows of the output softmax"), list(f.evidence)
        (True, ['fraction', 'advice'])
    """
    cause = cause_for(kind)
    if cause is None:
        return Finding(
            step=step,
            kind=kind,
            severity=severity,
            signal=signal,
            value=value,
            baseline=baseline,
            evidence=evidence,
            cause=text,
        )
    return Finding(
        step=step,
        kind=kind,
        severity=severity,
        signal=signal,
        value=value,
        baseline=baseline,
        evidence={**evidence, "advice": cause.advice_dicts(severity)},
        cause=f"{text} {cause.mechanism}",
        advice=cause.advice_text(severity=severity),
    )
