"""The scenario zoo: every scenario is registered, described and runnable; the slow tests run each in full and
check what keel says about it (the numbers are in BENCHMARKS.md, `keel bench detect`)."""

from __future__ import annotations

import math

import pytest

from keel.detect.diagnosis import MECHANISMS
from keel.harness.scenarios import SCENARIOS, Scenario, create_scenario, list_scenarios
from keel.harness.scenarios._common import ScenarioResult

INSTABILITIES = [n for n in list_scenarios() if not create_scenario(n).spec.healthy]
HEALTHY = [n for n in list_scenarios() if create_scenario(n).spec.healthy]


def test_the_zoo_has_eight_instabilities_and_four_healthy_runs():
    assert len(INSTABILITIES) >= 8 and len(HEALTHY) >= 4
    for name in list_scenarios():
        scenario = create_scenario(name)
        assert isinstance(scenario, Scenario)
        spec = scenario.spec
        assert spec.name == name and SCENARIOS.get(name).__module__.rsplit(".", 1)[-1] == name
        assert spec.summary
        assert (spec.expected_kind is None) == spec.healthy


@pytest.mark.parametrize("name", ["attention_logit_growth", "softmax_collapse"])
def test_a_short_run_is_a_real_training_run(name):
    result = create_scenario(name).run(steps=12)
    assert isinstance(result, ScenarioResult)
    assert len(result.losses) == 12 and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]  # it trains


@pytest.mark.slow
@pytest.mark.parametrize("name", INSTABILITIES)
def test_instability_is_detected_with_its_kind(name):
    scenario = create_scenario(name)
    result = scenario.run()
    kinds = {f.kind for f in result.alarms()}
    assert scenario.spec.expected_kind in kinds, (name, [(f.step, f.kind, f.severity) for f in result.alarms()])


@pytest.mark.slow
@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_run_raises_no_warning_or_critical(name):
    result = create_scenario(name).run()
    assert result.alarms() == [], [(f.step, f.kind, f.severity, f.signal) for f in result.alarms()]


# The claims on real (truncated) runs, fast: each run stops a few steps after the step at which
# `keel bench detect` first flags it (BENCHMARKS.md). Truncation leaves these runs unchanged up to there: the
# LM scenarios are still in their 20-step warm-up, and the modular runs have no schedule. Lead time needs the
# whole run (and the reference run) and is checked by the slow tests.
PREDICTIVE = {"attention_logit_growth": 20, "output_logit_divergence": 60, "softmax_collapse": 60}


@pytest.mark.parametrize("name", sorted(PREDICTIVE))
def test_first_alarm_of_a_truncated_run_names_the_instability(name):
    scenario = create_scenario(name)
    result = scenario.run(steps=PREDICTIVE[name])
    alarms = [(f.step, f.kind, f.severity) for f in result.alarms()]
    kinds = [kind for _, kind, _ in alarms]
    assert scenario.spec.expected_kind in kinds, alarms
    # nothing before it but other mechanisms (output_logit_divergence also collapses its fp16 softmax):
    # no symptom — spike, divergence, non-finite — came first
    before = kinds[: kinds.index(scenario.spec.expected_kind)]
    assert all(kind in MECHANISMS for kind in before), alarms


def test_non_finite_origin_names_the_module_after_the_logit_growth_that_leads_there():
    result = create_scenario("non_finite_origin").run(steps=20)
    alarms = result.alarms()
    kinds = [f.kind for f in alarms]
    assert kinds[0] == "attention_logit_growth" and "non_finite" in kinds, kinds
    [origin] = [f for f in alarms if f.kind == "non_finite_origin"]
    first_nan = next(f.step for f in alarms if f.kind == "non_finite")
    assert origin.step == first_nan and origin.evidence["module"].startswith("blocks.1."), origin.evidence
    assert alarms[0].step < first_nan
