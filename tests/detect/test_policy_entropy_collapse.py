"""Policy-entropy-collapse detector: relative to the run's own start, with lead time; silent on healthy GRPO runs
whatever their starting entropy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation, keys
from keel.detect.policy_entropy_collapse import PolicyEntropyCollapseConfig, PolicyEntropyCollapseDetector
from tests.detect.rl_series import entropy, feed


def test_a_collapse_warns_with_lead_time_then_turns_critical():
    found = feed(PolicyEntropyCollapseDetector(), entropy(0, collapse_from=100))
    assert [(f.kind, f.severity) for f in found] == [
        ("policy_entropy_collapse", "warning"),
        ("policy_entropy_collapse", "critical"),
    ]
    warning, critical = found
    # ×0.985 a step from 100 on a slowly falling base: 35 % of the start near step 140, 10 % near step 210
    assert 135 <= warning.step <= 160 and warning.evidence["fraction"] <= 0.35
    assert 200 <= critical.step <= 235 and critical.evidence["fraction"] <= 0.1
    assert critical.step - warning.step >= 50  # the lead time
    assert warning.step < warning.evidence["projected_critical_step"] <= critical.step


@pytest.mark.parametrize("scale", [0.05, 1.0, 40.0])
def test_the_threshold_is_relative_to_the_runs_own_start(scale):
    # rlwatch's absolute 1.0 nats would flag the 0.05-scale run from its first step and the 40-scale one never
    def scaled(run):
        return [Observation(step=o.step, values={keys.RL_ENTROPY: scale * o.values[keys.RL_ENTROPY]}) for o in run]

    assert feed(PolicyEntropyCollapseDetector(), scaled(entropy(0))) == []
    found = feed(PolicyEntropyCollapseDetector(), scaled(entropy(0, collapse_from=100)))
    assert [f.severity for f in found] == ["warning", "critical"]


def test_healthy_grpo_entropy_finds_nothing():
    assert feed(PolicyEntropyCollapseDetector(), entropy(0)) == []


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_healthy_grpo_entropy_finds_nothing_whatever_the_seed(seed):
    assert feed(PolicyEntropyCollapseDetector(), entropy(seed, n=300)) == []


def test_a_recovered_entropy_ends_the_episode():
    down = list(np.linspace(2.0, 0.3, 30))
    values = [2.0] * 20 + down + [2.0] * 30 + down + list(np.linspace(0.3, 0.1, 10)) + [0.1] * 10
    found = feed(
        PolicyEntropyCollapseDetector(),
        [Observation(step=s, values={keys.RL_ENTROPY: v}) for s, v in enumerate(values)],
    )
    # 15 % and falling: a warning; back at the start: the episode ends, so the second fall warns again
    assert [f.severity for f in found] == ["warning", "warning", "critical"]
    assert found[0].step < 50 < 80 < found[1].step


def test_state_round_trip_mid_episode():
    run = entropy(2, collapse_from=100)
    expected = [f.to_dict() for f in feed(PolicyEntropyCollapseDetector(), run)[1:]]
    det = PolicyEntropyCollapseDetector()
    feed(det, run[:170])
    restored = PolicyEntropyCollapseDetector()
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert [f.to_dict() for f in feed(restored, run[170:])] == expected


def test_bad_config_names_the_fields():
    with pytest.raises(ValueError, match=r"warn_fraction=0.05, critical_fraction=0.1"):
        PolicyEntropyCollapseConfig(warn_fraction=0.05)
    with pytest.raises(ValueError, match=r"PolicyEntropyCollapseConfig.window=2"):
        PolicyEntropyCollapseConfig(window=2)
