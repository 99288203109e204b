"""Attention-logit-growth detector: exact detection steps on traces with known onsets, silence on healthy ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from keel._core import Observation
from keel.detect.attention_logit_growth import AttentionLogitGrowthDetector, attention_logit_growth_config
from keel.detect.growth import GrowthConfig, GrowthDetector

KEY = "attn/max_logit"


def run(det, values, start=0):
    found = []
    for i, v in enumerate(values):
        found += det.update(Observation(step=start + i, values={KEY: v}))
    return found


def healthy_trace(n=300, seed=0):
    """Max logit of keel's small proxy at lr 3e-3: near-zero start, ×1.27/step growth, levelling off near 50."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    level = 0.24 + 50 / (1 + np.exp(-(t - 35) / 6.5))  # logistic: fastest growth 50/(4·6.5) ≈ 1.9 per step
    return list(level * np.exp(rng.normal(0, 0.08, n)))


def test_exponential_growth_is_flagged_at_the_exact_step_with_its_projection():
    quiet = [2.0 + 0.1 * math.sin(s) for s in range(60)]
    growth = [2.0 * 1.5**k for k in range(1, 25)]  # from step 60: ×1.5 per step (rate 0.405)
    found = run(AttentionLogitGrowthDetector(), quiet + growth)
    # 2·1.5³ = 6.75 ≥ 5 at step 62 is the first qualifying step; patience 2 → step 63
    warning, critical = found
    assert (warning.step, warning.severity) == (63, "warning")
    assert warning.evidence["rate_per_step"] == pytest.approx(math.log(1.5), rel=1e-3)
    assert warning.evidence["onset_step"] == 58  # the first window (steps 58–62) in which the growth showed
    # at the warning the logit is 2·1.5⁴ = 10.1: it reaches 1000 after log(1000/10.1)/log(1.5) ≈ 11.3 more steps
    assert warning.evidence["steps_to_critical"] == pytest.approx(11.3, abs=0.1)
    assert warning.evidence["projected_critical_step"] == 75
    assert [r["action"] for r in warning.evidence["advice"]][0].startswith("add QK-norm")
    assert "QK-norm" in warning.advice and "Dehghani" in warning.advice
    # the logit crosses 1000 at 2·1.5^k ≥ 1000 → k = 16 → step 75: the projection was right
    assert (critical.step, critical.severity) == (75, "critical")


def test_healthy_growth_from_initialisation_is_silent():
    for seed in range(5):
        assert run(AttentionLogitGrowthDetector(), healthy_trace(seed=seed)) == []


def test_sustained_slow_growth_above_the_clip_level_is_flagged():
    values = [120.0 * math.exp(0.01 * s) for s in range(100)]  # doubling every 69 steps, above τ = 100
    found = run(AttentionLogitGrowthDetector(), values)
    assert [(f.step, f.severity) for f in found] == [(10, "warning")]
    assert found[0].evidence["doubling_steps"] == pytest.approx(69.3, abs=0.5)


def test_high_but_flat_logits_are_silent_and_nonfinite_values_are_skipped():
    flat = [300.0 * (1 + 0.05 * math.sin(s)) for s in range(200)]
    assert run(AttentionLogitGrowthDetector(), flat) == []
    assert run(AttentionLogitGrowthDetector(), [math.nan, math.inf, -1.0, 0.0]) == []


def test_one_finding_per_severity_per_episode_and_a_new_episode_after_recovery():
    det = AttentionLogitGrowthDetector()
    up = [2.0 * 1.6**k for k in range(12)]  # 2 → 350: warning only
    down = [1.0] * 5
    found = run(det, up + down + up)
    assert [f.severity for f in found] == ["warning", "warning"]
    assert found[1].step > len(up) + len(down)


def test_state_dict_round_trip_continues_identically():
    values = [2.0 * 1.4**k for k in range(20)]
    a, b = AttentionLogitGrowthDetector(), AttentionLogitGrowthDetector()
    run(a, values[:6])
    state = json.loads(json.dumps(a.state_dict()))
    b.load_state_dict(state)
    assert [f.to_dict() for f in run(a, values[6:], start=6)] == [f.to_dict() for f in run(b, values[6:], start=6)]


def test_config_validation_names_field_value_and_allowed():
    with pytest.raises(ValueError, match=r"GrowthConfig.fast_rate=-1; allowed: a finite number > 0"):
        attention_logit_growth_config(fast_rate=-1)
    with pytest.raises(ValueError, match=r"min_level <= high_level <= critical_level"):
        GrowthConfig(signal=KEY, kind="x", min_level=10.0, high_level=5.0)
    with pytest.raises(ValueError, match=r"GrowthConfig.short_window=1; allowed: an int >= 2"):
        GrowthConfig(signal=KEY, kind="x", short_window=1)
    assert GrowthDetector(GrowthConfig(signal="act/rms", kind="activation_growth")).name == "activation_growth"
