"""Entropy-collapse detector: exact steps on a collapsing trace, silence on a healthy one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from keel._core import Observation
from keel.detect.attention_entropy_collapse import AttentionEntropyCollapseDetector, EntropyCollapseConfig

KEY = "attn/entropy"


def run(det, values, every=10, start=0):
    return [f for i, v in enumerate(values) for f in det.update(Observation(step=start + every * i, values={KEY: v}))]


def test_collapse_is_flagged_at_the_exact_steps():
    # baseline 3.2 (uniform attention); falls linearly by 0.2 per measurement from the 5th
    values = [3.2, 3.19, 3.2, 3.18] + [3.2 - 0.2 * k for k in range(1, 16)]
    found = run(AttentionEntropyCollapseDetector(), values)
    # 20 % of 3.2 = 0.64: first reached by 3.2 − 0.2·13 = 0.6 at index 3 + 13 = 16 (step 160);
    # 5 % = 0.16: never reached by the last value 0.2
    assert [(f.step, f.severity) for f in found] == [(160, "warning")]
    finding = found[0]
    assert finding.evidence["fraction"] == pytest.approx(0.6 / 3.2, abs=1e-4)
    assert finding.evidence["slope_per_step"] == pytest.approx(-0.02, rel=1e-6)
    assert finding.evidence["steps_to_critical"] == pytest.approx((0.6 - 0.16) / 0.02, abs=0.1)
    assert "σReparam" in finding.advice and "Zhai" in finding.advice
    found = run(AttentionEntropyCollapseDetector(), values + [0.1, 0.05])
    assert [(f.step, f.severity) for f in found] == [(160, "warning"), (190, "critical")]


def test_healthy_decline_to_half_is_silent():
    rng = np.random.default_rng(0)
    t = np.arange(150)
    healthy = 1.7 + 1.5 / (1 + np.exp((t - 20) / 4)) + rng.normal(0, 0.05, t.size)  # 3.2 → 1.7, keel proxy lr 3e-3
    assert run(AttentionEntropyCollapseDetector(), list(healthy), every=2) == []


def test_one_warning_per_episode_and_nonfinite_is_skipped():
    down = [3.0, 3.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3]
    back = [1.5, 2.5, 2.8]  # recovers above 2 × 20 %: the episode ends
    found = run(AttentionEntropyCollapseDetector(EntropyCollapseConfig(window=3)), down + back + [0.5, 0.4])
    assert [(f.step, f.severity) for f in found] == [(50, "warning"), (110, "warning")]
    assert run(AttentionEntropyCollapseDetector(), [math.nan, math.inf, 3.0]) == []


def test_state_round_trip_and_validation():
    values = [3.2, 3.2, 3.2] + [3.2 * 0.8**k for k in range(1, 20)]
    a, b = AttentionEntropyCollapseDetector(), AttentionEntropyCollapseDetector()
    run(a, values[:8])
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [f.to_dict() for f in run(a, values[8:], start=80)] == [f.to_dict() for f in run(b, values[8:], start=80)]
    with pytest.raises(ValueError, match=r"warn_fraction=0.01, critical_fraction=0.5"):
        EntropyCollapseConfig(warn_fraction=0.01, critical_fraction=0.5)
