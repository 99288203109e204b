"""The scenario zoo: every scenario is registered, described and runnable; the slow tests run each in full and
check what keel says about it (the numbers are in BENCHMARKS.md, `keel bench detect`)."""

from __future__ import annotations

import math

import pytest

from keel.proxy.scenarios import SCENARIOS, Scenario, create_scenario, list_scenarios
from keel.proxy.scenarios._common import ScenarioResult

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
