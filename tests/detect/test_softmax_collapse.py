"""Softmax-collapse detector: exact steps, silence at zero, evidence from companion signals."""

from __future__ import annotations

import json

import pytest

from keel._core import Observation
from keel.detect.softmax_collapse import SoftmaxCollapseConfig, SoftmaxCollapseDetector

KEY = "logits/softmax_collapse"


def run(det, values, extra=None):
    return [f for s, v in enumerate(values) for f in det.update(Observation(step=s, values={KEY: v, **(extra or {})}))]


def test_exact_steps_and_evidence():
    values = [0.0] * 20 + [0.005, 0.012, 0.03, 0.2, 0.45, 0.51, 0.9]
    found = run(SoftmaxCollapseDetector(), values, extra={"logits/zero_loss": 0.3, "grad/weight_cos": -0.97})
    assert [(f.step, f.severity) for f in found] == [(22, "warning"), (25, "critical")]
    assert found[0].evidence["onset_step"] == 21  # first measurement at or above 1 %
    assert found[0].evidence["grad/weight_cos"] == -0.97 and found[0].evidence["logits/zero_loss"] == 0.3
    assert "StableMax" in found[0].advice and "Prieto" in found[0].advice


def test_zero_and_isolated_blips_are_silent():
    assert run(SoftmaxCollapseDetector(), [0.0] * 500) == []
    assert run(SoftmaxCollapseDetector(), [0.0, 0.02, 0.0, 0.0, 0.03, 0.0, float("nan")]) == []


def test_state_round_trip_and_validation():
    a, b = SoftmaxCollapseDetector(), SoftmaxCollapseDetector()
    run(a, [0.0, 0.02])
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [f.step for f in b.update(Observation(step=2, values={KEY: 0.03}))] == [2]
    with pytest.raises(ValueError, match=r"SoftmaxCollapseConfig.patience=0; allowed: an int >= 1"):
        SoftmaxCollapseConfig(patience=0)


def test_collapsed_from_the_first_measurement_is_not_judged():
    # a one-output model's "softmax" is one-hot at every step (the 30 rollbacks in 60 steps); a fraction
    # that was never below warn_fraction is the model's shape or a state from before keel watched: a rollback
    # cannot reach a healthy state, so no warning or critical — one info says why
    found = run(SoftmaxCollapseDetector(), [1.0] * 60)
    assert [(f.step, f.severity) for f in found] == [(0, "info")]
    assert "first measurement" in found[0].cause


def test_collapse_after_a_healthy_measurement_is_still_judged():
    found = run(SoftmaxCollapseDetector(), [1.0, 1.0, 0.0, 0.02, 0.03, 0.6])
    assert [(f.step, f.severity) for f in found] == [(0, "info"), (4, "warning"), (5, "critical")]


def test_state_without_the_new_field_loads():
    det = SoftmaxCollapseDetector()
    state = det.state_dict()
    for key in ("seen_healthy", "told"):
        state.pop(key, None)
    det.load_state_dict(state)
    assert [f.severity for f in run(det, [0.0, 0.6])] == ["critical"]
