"""The doctor's table prints a cause and advice once for a run of findings that repeat them (a Guard store of 40
consecutive critical spikes printed 40 identical six-line blocks), and again whenever they change."""

from keel._core.finding import Finding
from keel.doctor.result import DoctorResult
from keel.doctor.text import format_result


def _spike(step, ratio, *, kind="loss_spike", advice="Skip this update (policy='skip')."):
    return Finding(
        step=step,
        kind=kind,
        severity="critical",
        signal="loss",
        value=2.0 * ratio,
        baseline=2.0,
        evidence={"ratio": ratio},
        cause=f"The loss jumped to {ratio}× its recent median in one step.",
        advice=advice,
    )


def _text(findings):
    return format_result(DoctorResult(source="log.csv", format="csv", findings=findings, summary={}))


def test_repeated_cause_and_advice_are_printed_once_per_run_of_same_kind_findings():
    text = _text([_spike(10 + i, 2.0 + i / 10) for i in range(5)])
    assert text.count("cause:") == 1 and text.count("advice:") == 1
    assert all(f"\n{10 + i:>8}  critical  loss_spike" in text for i in range(5))  # every finding keeps its row
    assert text.count("cause and advice as above") == 1


def test_a_changed_advice_or_kind_prints_cause_and_advice_again():
    findings = [
        _spike(10, 2.1),
        _spike(11, 2.2, advice="Roll back."),
        _spike(12, 2.3, kind="grad_spike"),
        _spike(13, 2.4),
    ]
    text = _text(findings)
    assert text.count("cause:") == 4 and text.count("advice:") == 4
