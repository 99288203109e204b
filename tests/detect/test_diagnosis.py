"""Diagnosis rules: mechanisms before symptoms, folding, lead time, the store form."""

from __future__ import annotations

from keel._core import Finding
from keel.detect.causes import CAUSES
from keel.detect.diagnosis import diagnose, format_diagnoses


def f(step, kind, severity="warning", **evidence):
    return Finding(step=step, kind=kind, severity=severity, signal="x", evidence=evidence)


def test_mechanism_explains_later_symptoms_and_folds_entropy_collapse():
    found = [
        f(3, "loss_spike", "info"),
        f(8, "attention_logit_growth", level=15.5),
        f(20, "attention_entropy_collapse"),
        f(33, "attention_logit_growth", "critical"),
        f(40, "loss_spike", "critical"),
        f(60, "divergence"),
    ]
    (d,) = diagnose(found)
    assert (d.kind, d.first_step, d.critical_step, d.severity) == ("attention_logit_growth", 8, 33, "critical")
    assert d.consequences == {"loss_spike": 40, "divergence": 60}
    assert d.evidence["level"] == 15.5 and d.evidence["attention_entropy_collapse"]["first_step"] == 20
    assert d.advice[0]["action"].startswith("add QK-norm") and "Dehghani" in d.advice[0]["source"]


def test_symptom_before_any_mechanism_is_its_own_cause_and_order_is_by_first_sighting():
    found = [f(5, "loss_spike", "critical"), f(50, "softmax_collapse"), f(30, "edge_of_stability")]
    assert [d.kind for d in diagnose(found)] == ["loss_spike", "edge_of_stability", "softmax_collapse"]
    late = [f(448, "divergence"), f(456, "output_logit_drift")]  # a mechanism seen after the symptom
    assert [(d.kind, d.consequences) for d in diagnose(late)] == [("divergence", {}), ("output_logit_drift", {})]
    assert diagnose([f(5, "loss_spike", "info")]) == []
    assert format_diagnoses([]).startswith("No instability")


def test_lead_time_and_store_form():
    losses = [3.0] * 90 + [4.0] * 60
    (d,) = diagnose([f(8, "attention_logit_growth")], losses=losses)
    assert (d.degraded_step, d.lead_steps) == (90, 82)
    assert "first seen at step 8" in d.summary() and "82 steps later" in d.summary()
    assert d.when() == "first seen at step 8; the loss degraded at step 90, 82 steps later"
    assert d.to_dict()["when"] == d.when() and d.when() in d.summary()
    stored = d.to_finding()
    assert stored.kind == "diagnosis" and stored.signal == "attention_logit_growth"
    assert stored.evidence["lead_steps"] == 82 and "QK-norm" in stored.advice


def test_every_cause_has_sourced_advice():
    for kind, cause in CAUSES.items():
        assert cause.kind == kind and cause.advice, kind
        assert all(r.source and r.action for r in cause.advice), kind


def test_where_nan_was_born_is_evidence_for_the_explaining_cause():
    found = [
        f(8, "attention_logit_growth"),
        f(15, "non_finite", "critical"),
        f(15, "non_finite_origin", "critical", module="blocks.1.attn.qkv", **{"pass": "backward"}),
    ]
    (d,) = diagnose(found)
    assert d.evidence["born_in"] == {"module": "blocks.1.attn.qkv", "pass": "backward", "step": 15}
    assert "born in blocks.1.attn.qkv (backward pass" in d.summary()
    (alone,) = diagnose(found[1:])
    assert alone.kind == "non_finite" and alone.evidence["born_in"]["module"] == "blocks.1.attn.qkv"


def _summary_of(found):
    from keel.guard.summary import format_summary  # noqa: PLC0415  (the console summary the user reads)

    return format_summary(
        status="finished",
        steps=100,
        policy="warn",
        findings=found,
        decisions=[],
        diagnoses=diagnose(found),
        run_dir=None,
    )


def test_a_warning_level_spike_is_not_advised_to_skip_the_update_a_critical_one_is():
    # a warning is a sustained rise that skips nothing: the summary said "advice: skip the update" against the
    # warning's own advice (lower the LR, check the logits); a critical one-step jump is what skipping is for
    for kind in ("loss_spike", "grad_spike"):
        (warned,) = diagnose([f(40, kind, "warning"), f(45, kind, "warning")])
        assert "skip" not in warned.advice[0]["action"], warned.advice
        assert warned.advice[0]["action"].startswith("lower the learning rate"), warned.advice
        assert "skip the update" not in warned.summary() and "skip the update" not in warned.to_finding().advice
        (critical,) = diagnose([f(40, kind, "warning"), f(41, kind, "critical")])
        assert critical.advice[0]["action"].startswith("skip the update"), critical.advice
    line = next(s for s in _summary_of([f(40, "loss_spike")]).splitlines() if "cause 1" in s)
    assert line.startswith("  cause 1: loss spike (first seen at step 40); advice: lower the learning rate"), line
    line = next(s for s in _summary_of([f(40, "loss_spike", "critical")]).splitlines() if "cause 1" in s)
    assert line.startswith("  cause 1: loss spike (first seen at step 40); advice: skip the update"), line


def test_advice_for_a_severity_falls_back_to_the_cause_advice():
    cause = CAUSES["divergence"]
    assert cause.advice_for("warning") == cause.advice_for("critical") == cause.advice
    spike = CAUSES["loss_spike"]
    assert spike.advice_for("critical") == spike.advice and spike.advice_for("warning") != spike.advice
    assert [r["rank"] for r in spike.advice_dicts("warning")] == list(range(1, len(spike.advice_for("warning")) + 1))


def test_the_non_finite_advice_rolls_back_non_finite_weights_rather_than_only_skipping():
    """h22-O: after a rollback for an Inf written into a weight the summary advised 'skip the update' alone."""
    from keel.detect.causes import cause_for

    first = cause_for("non_finite").advice_for("critical")[0].action
    assert "roll back" in first and "weights" in first and "policy='recover'" in first


def test_a_lead_time_of_one_step_is_said_in_the_singular():
    for degraded, said in ((9, "1 step later"), (7, "1 step earlier")):
        (d,) = diagnose([f(8, "attention_logit_growth")], losses=[3.0] * degraded + [9.0] * 40)
        assert d.when() == f"first seen at step 8; the loss degraded at step {degraded}, {said}"
