"""Diagnosis: a run's findings → named causes, ranked, each with its evidence, first sighting and advice.

Rules, in order:

1. Only warnings and criticals name a cause (an ``info`` finding is context, not an alarm); keel's own
   errors (``keel_error``) and earlier diagnoses are not causes of a training instability.
2. Findings of one kind form one candidate cause; its first step is when it was first seen.
3. Mechanisms explain symptoms: a growth of attention or output logits, a softmax or entropy collapse, a
   learning rate beyond the edge of stability, ε-dominance or activation growth *explain* loss spikes,
   divergence and non-finite values; when a mechanism was seen before a symptom, the symptom is listed as
   its consequence rather than as a cause of its own.
4. Causes rank by first sighting (the one that started it first); at the same step a mechanism ranks
   before a symptom, then the more severe first.
5. Attention-entropy collapse seen after attention-logit growth is the same event (large logits make
   attention one-hot): it is folded into the logit-growth diagnosis as evidence.
6. Where a non-finite value was born (``non_finite_origin``) is evidence, attached to the diagnosis that
   explains the non-finite values (``born_in``), or to the ``non_finite`` diagnosis itself.

Each diagnosis carries the advice of `keel.detect.causes`, each piece with its source. With the loss curve (and
optionally a reference run with the fix applied) it also says how many steps before the loss
degraded the cause was first seen (`keel.detect.lead_time`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from keel._core.decision import Decision
from keel._core.finding import Finding, Severity, severity_rank
from keel.detect._finding import skip_mends
from keel.detect.causes import CAUSES, cause_for
from keel.detect.lead_time import degradation_step, lead_steps

MECHANISMS = (
    "attention_logit_growth",
    "output_logit_drift",
    "softmax_collapse",
    "edge_of_stability",
    "attention_entropy_collapse",
    "activation_growth",
    "eps_dominance",
)
SYMPTOMS = ("non_finite", "divergence", "loss_spike", "grad_spike")
LOCATION = "non_finite_origin"  # where a non-finite value was born: evidence for whoever explains it
FOLDED = {"attention_entropy_collapse": "attention_logit_growth"}
NOT_CAUSES = ("diagnosis", "keel_error")  # a diagnosis itself; a bug in keel, not in the training run


@dataclass(frozen=True, kw_only=True)
class Diagnosis:
    """One named cause of a run's trouble.

    Attributes:
        kind: The cause's kind (a key of `keel.detect.causes.CAUSES` when known).
        title: Its name in words.
        severity: The worst severity among its findings.
        first_step: The step it was first seen (its first warning or critical finding).
        critical_step: The step it first became critical, if it did.
        mechanism: How it hurts training.
        evidence: The first finding's evidence (without the advice list), plus what was folded in.
        advice: Ranked advice, each piece with its source.
        consequences: Symptom kinds seen after it (loss spike, divergence, non-finite), with their first step.
        degraded_step: When the loss degraded (when losses were given).
        lead_steps: ``degraded_step − first_step``: how early it was seen.
    """

    kind: str
    title: str
    severity: Severity
    first_step: int
    critical_step: int | None
    mechanism: str
    evidence: dict[str, Any] = field(default_factory=dict)
    advice: list[dict[str, Any]] = field(default_factory=list)
    consequences: dict[str, int] = field(default_factory=dict)
    degraded_step: int | None = None
    lead_steps: int | None = None

    def when(self) -> str:
        """When it was first seen, when it turned critical, and how many steps before the loss degraded."""
        when = f"first seen at step {self.first_step}"
        if self.critical_step is not None and self.critical_step != self.first_step:
            when += f", critical at step {self.critical_step}"
        if self.lead_steps is not None and self.degraded_step is not None:
            lead = abs(self.lead_steps)
            when += f"; the loss degraded at step {self.degraded_step}, {lead} step{'' if lead == 1 else 's'} " + (
                "later" if self.lead_steps >= 0 else "earlier"
            )
        return when

    def summary(self) -> str:
        """One paragraph: the cause, when it was seen, how early, and the top advice."""
        when = self.when()
        then = ""
        if self.consequences:
            seen = ", ".join(f"{k.replace('_', ' ')} at step {s}" for k, s in self.consequences.items())
            then = f" Then: {seen}."
        born = self.evidence.get("born_in")
        if born:
            then += f" NaN/Inf was born in {born['module']} ({born['pass']} pass, step {born['step']})."
        fixes = " ".join(f"{r['rank']}. {r['action']} ({r['source']})." for r in self.advice[:3])
        return f"{self.title.capitalize()} ({when}). {self.mechanism}{then} Advice: {fixes}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus ``when`` and ``summary`` (the run store's ``diagnosis`` meta holds a list
        of these)."""
        return {
            "kind": self.kind,
            "title": self.title,
            "severity": self.severity,
            "first_step": self.first_step,
            "critical_step": self.critical_step,
            "degraded_step": self.degraded_step,
            "lead_steps": self.lead_steps,
            "consequences": dict(self.consequences),
            "mechanism": self.mechanism,
            "evidence": dict(self.evidence),
            "advice": list(self.advice),
            "when": self.when(),
            "summary": self.summary(),
        }

    def to_finding(self) -> Finding:
        """The diagnosis as a ``diagnosis`` finding, for the run store."""
        evidence = {
            "cause": self.kind,
            "first_step": self.first_step,
            "critical_step": self.critical_step,
            "consequences": self.consequences,
            "degraded_step": self.degraded_step,
            "lead_steps": self.lead_steps,
            "advice": self.advice,
            **self.evidence,
        }
        top = "; ".join(f"{r['action']} ({r['source']})" for r in self.advice[:3])
        return Finding(
            step=self.first_step,
            kind="diagnosis",
            severity=self.severity,
            signal=self.kind,
            evidence=evidence,
            cause=f"{self.title}: {self.mechanism}",
            advice=top,
        )


def diagnose(
    findings: Sequence[Finding],
    *,
    losses: Sequence[float] | None = None,
    reference_losses: Sequence[float] | None = None,
) -> list[Diagnosis]:
    """Named causes of the findings, most likely first (see the module doc for the rules).

    Args:
        findings: A run's findings (from `Guard.findings` or a run store).
        losses: The run's loss per step, to compute when the loss degraded and the lead time.
        reference_losses: A reference run with the fix applied, for `degradation_step`.

    Example:
        >>> from keel._core import Finding
        >>> found = [Finding(step=8, kind="attention_logit_growth", severity="warning", signal="attn/max_logit"),
        ...          Finding(step=30, kind="loss_spike", severity="critical", signal="loss")]
        >>> [(d.kind, d.first_step, d.consequences) for d in diagnose(found)]
        [('attention_logit_growth', 8, {'loss_spike': 30})]
    """
    alarms = sorted(
        (f for f in findings if severity_rank(f.severity) >= 1 and f.kind not in NOT_CAUSES), key=lambda f: f.step
    )
    if not alarms:
        return []
    by_kind: dict[str, list[Finding]] = {}
    for f in alarms:
        by_kind.setdefault(f.kind, []).append(f)
    origin = by_kind.pop(LOCATION, [None])[0]
    if origin is not None and "non_finite" not in by_kind:
        by_kind["non_finite"] = [origin]
    first = {kind: fs[0].step for kind, fs in by_kind.items()}
    mechanisms = [k for k in by_kind if k not in SYMPTOMS]
    folded: dict[str, list[str]] = {}
    for kind, into in FOLDED.items():
        if kind in first and into in first and first[into] <= first[kind]:
            mechanisms.remove(kind)
            folded.setdefault(into, []).append(kind)
    mechanisms.sort(key=lambda k: (first[k], -max(severity_rank(f.severity) for f in by_kind[k])))
    explained: dict[str, dict[str, int]] = {}
    causes = list(mechanisms)
    for symptom in (k for k in by_kind if k in SYMPTOMS):
        owner = next((m for m in mechanisms if first[m] <= first[symptom]), None)
        if owner is None:
            causes.append(symptom)
        else:
            explained.setdefault(owner, {})[symptom] = first[symptom]
    # the earliest first; at the same step a mechanism before a symptom, then the more severe
    causes.sort(key=lambda k: (first[k], k in SYMPTOMS, -max(severity_rank(f.severity) for f in by_kind[k])))
    degraded = degradation_step(losses, reference_losses) if losses is not None else None
    out = []
    for kind in causes:
        fs = by_kind[kind]
        cause = cause_for(kind)
        crit = next((f.step for f in fs if f.severity == "critical"), None)
        evidence = {k: v for k, v in fs[0].evidence.items() if k != "advice"}
        for other in folded.get(kind, []):
            evidence[other] = {"first_step": first[other], "value": by_kind[other][0].value}
        if origin is not None and (kind == "non_finite" or "non_finite" in explained.get(kind, {})):
            evidence["born_in"] = {
                "module": origin.evidence.get("module"),
                "pass": origin.evidence.get("pass"),
                "step": origin.step,
            }
        severity = max((f.severity for f in fs), key=severity_rank)
        out.append(
            Diagnosis(
                kind=kind,
                title=cause.title if cause else kind.replace("_", " "),
                severity=severity,
                first_step=fs[0].step,
                critical_step=crit,
                mechanism=cause.mechanism if cause else fs[0].cause,
                evidence=evidence,
                advice=cause.advice_dicts(_advised_as(fs, severity))  # a warning that skipped nothing: not told to skip
                if cause
                else [{"rank": 1, "action": fs[0].advice, "how": "", "source": ""}],
                consequences=explained.get(kind, {}),
                degraded_step=degraded,
                lead_steps=lead_steps(fs[0].step, degraded),
            )
        )
    return out


def _advised_as(findings: list[Finding], severity: Severity) -> Severity:
    """The severity whose advice fits ``findings`` (of one kind, worst ``severity``): a ``critical`` no skip is left to
    mend gets a warning's advice — a lasting level shift (evidence ``level_shift``: no skip mends it), or a spike the
    run skipped itself (``skipped_by``, `skipped_already`)."""
    criticals = [f for f in findings if f.severity == "critical"]
    if criticals and all(f.evidence.get("level_shift") is True or "skipped_by" in f.evidence for f in criticals):
        return "warning"
    return severity


def skipped_already(findings: Sequence[Finding], decisions: Sequence[Decision]) -> list[Finding]:
    """``findings`` with each ``critical`` one that a skip mends (a loss or gradient spike, non-finite gradients) at a
    step the training code skipped itself (a ``skip`` `Decision` by ``"trainer"``: OLMo-core's SkipStepOptimizer, read
    from its log) saying so: evidence ``skipped_by``, and advice that does not ask to skip it again. The severity stays:
    it measures the jump, as for a spike keel skipped.

    Example:
        >>> spike = Finding(step=40, kind="loss_spike", severity="critical", signal="loss", advice="Skip this update.")
        >>> [f.advice[:40] for f in skipped_already([spike], [Decision(step=40, action="skip", by="trainer")])]
        ['None for this step: the trainer skipped ']
    """
    skipped = {d.step for d in decisions if d.action == "skip" and d.by == "trainer"}
    return [_skipped(f) if f.severity == "critical" and f.step in skipped and skip_mends(f) else f for f in findings]


def _skipped(finding: Finding) -> Finding:
    return replace(
        finding,
        evidence={**finding.evidence, "skipped_by": "trainer"},
        advice="None for this step: the trainer skipped this update itself (its log says so). If such steps recur, "
        "clip gradients or use spike-aware clipping (Stable-SPAM AdaClip, Huang et al. 2025) and lower the learning "
        "rate.",
    )


def format_diagnoses(diagnoses: Sequence[Diagnosis]) -> str:
    """Numbered summaries for a terminal; "no instability found" when empty."""
    if not diagnoses:
        return "No instability found: no warning or critical finding."
    return "\n".join(f"{i}. {d.summary()}" for i, d in enumerate(diagnoses, 1))


def known_causes() -> list[str]:
    """Kinds the catalogue can name, with advice."""
    return sorted(CAUSES)
