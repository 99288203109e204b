"""KL-blow-up detector: exponential growth warned before it is critical, a non-finite KL critical at once, silence on
a healthy KL that starts at 0 and on runs that log no KL."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation, keys
from keel.detect.kl_blowup import KLBlowupConfig, KLBlowupDetector
from tests.detect.rl_series import feed, kl


def test_a_growing_kl_warns_with_lead_time_and_an_overflow_is_critical():
    found = feed(KLBlowupDetector(), kl(0, blow_from=300))
    assert [(f.kind, f.severity) for f in found] == [
        ("kl_blowup", "warning"),
        ("kl_blowup", "critical"),
        ("kl_blowup", "critical"),
    ]
    warning, at_level, overflow = found
    # ×1.1 a step from 300 on a ~0.03 plateau: 0.05 nats (the level gate) within a few steps, 10 nats near 361
    assert 300 <= warning.step <= 320 and math.log(1.1) >= warning.evidence["growth_per_step"] >= 0.05
    assert 350 <= at_level.step <= 365 and at_level.value >= 10
    assert abs(warning.evidence["projected_critical_step"] - at_level.step) <= 60
    assert overflow.step == 450 and overflow.evidence["non_finite"] == "inf"  # the k3 overflow of trl#3015


def test_one_jump_is_a_warning_only_when_it_lasts():
    values = [0.08 * (1.1 if s % 2 else 0.9) for s in range(60)]
    one = values + [2.0] + values[:10]
    assert feed(KLBlowupDetector(), [Observation(step=s, values={keys.RL_KL: v}) for s, v in enumerate(one)]) == []
    two = values + [2.0, 2.2] + values[:10]
    found = feed(KLBlowupDetector(), [Observation(step=s, values={keys.RL_KL: v}) for s, v in enumerate(two)])
    assert [(f.step, f.severity) for f in found] == [(61, "warning")]
    assert found[0].evidence["ratio"] > 20


def test_non_finite_is_critical_once_per_run_of_them():
    values = [0.02] * 30 + [math.nan, math.inf, 0.02, 0.02, math.inf]
    found = feed(KLBlowupDetector(), [Observation(step=s, values={keys.RL_KL: v}) for s, v in enumerate(values)])
    assert [(f.step, f.severity) for f in found] == [(30, "critical"), (34, "critical")]


def test_healthy_kl_finds_nothing():
    assert feed(KLBlowupDetector(), kl(0)) == []


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_healthy_kl_finds_nothing_whatever_the_seed(seed):
    assert feed(KLBlowupDetector(), kl(seed, n=300)) == []


def test_a_run_without_kl_is_silent():
    # TRL logs no kl with beta=0 (its default): the detector must not read absence as anything
    det = KLBlowupDetector()
    assert feed(det, [Observation(step=s, values={keys.RL_ENTROPY: 1.0}) for s in range(100)]) == []


def test_state_round_trip_mid_episode():
    run = kl(3, blow_from=300)
    expected = [f.to_dict() for f in feed(KLBlowupDetector(), run)[1:]]
    det = KLBlowupDetector()
    feed(det, run[:330])
    restored = KLBlowupDetector()
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert [f.to_dict() for f in feed(restored, run[330:])] == expected


def test_bad_config_names_the_fields():
    with pytest.raises(ValueError, match=r"min_history=60, window=50"):
        KLBlowupConfig(min_history=60)
    with pytest.raises(ValueError, match=r"KLBlowupConfig.growth_rate=0"):
        KLBlowupConfig(growth_rate=0)
