"""Edge-of-stability detector: the benign edge (margin ≈ 1) is silent, an LR beyond it is flagged."""

from __future__ import annotations

import json

import pytest

from keel._core import Observation
from keel.detect.edge_of_stability import EdgeOfStabilityConfig, EdgeOfStabilityDetector


def obs(step, margin=None, lr=0.01):
    values = {"lr": lr}
    if margin is not None:
        values["curvature/margin"] = margin
    return Observation(step=step, values=values)


def test_benign_oscillation_at_the_edge_is_silent():
    det = EdgeOfStabilityDetector()
    margins = [0.4, 0.8, 0.95, 1.05, 1.2, 0.98, 1.4, 1.1, 1.9]  # hovering at the edge of stability
    assert [f for i, m in enumerate(margins) for f in det.update(obs(25 * i, m))] == []


def test_lr_jump_is_flagged_in_the_step_it_is_measured():
    det = EdgeOfStabilityDetector()
    found = [
        f
        for o in [obs(0, 0.8), obs(1), obs(2), obs(3, 2.5, lr=0.03), obs(4), obs(5, 12.0, lr=0.1)]
        for f in det.update(o)
    ]
    assert [(f.step, f.severity) for f in found] == [(3, "warning"), (5, "critical")]
    assert found[0].evidence["typical_margin"] == 0.8
    assert found[0].evidence["stable_lr"] == pytest.approx(0.012)
    assert "lower the learning rate" in found[0].advice


def test_adam_start_and_creeping_margins_are_silent_and_episodes_restart():
    det = EdgeOfStabilityDetector()
    start = [obs(0, 40.0, lr=1e-4), obs(1, 25.0, lr=2e-4), obs(3, 9.0, lr=4e-4), obs(7, 3.0, lr=8e-4)]
    creep = [obs(25 * k, 0.5 + 0.25 * k) for k in range(1, 10)]  # progressive sharpening up to 2.75
    assert [f for o in start + creep for f in det.update(o)] == []
    det = EdgeOfStabilityDetector()
    steps = [obs(0, 0.5), obs(1, 3.0), obs(2, 2.5), obs(3, 0.8), obs(4, 0.5), obs(5, 3.0)]
    assert [f.step for o in steps for f in det.update(o)] == [1, 5]
    other = EdgeOfStabilityDetector()
    other.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert other.state_dict() == det.state_dict()
    with pytest.raises(ValueError, match=r"warn_margin=0.5"):
        EdgeOfStabilityConfig(warn_margin=0.5)


def test_evidence_names_the_fastest_groups_lr():
    # with parameter groups at different LRs the probe's margin is the fastest group's: so is the evidence's LR
    det = EdgeOfStabilityDetector()
    det.update(Observation(step=0, values={"curvature/margin": 1.0, "lr": 0.0, "lr/1": 0.01}))
    found = det.update(Observation(step=5, values={"curvature/margin": 10.0, "lr": 0.0, "lr/1": 0.1}))
    assert [f.severity for f in found] == ["critical"]
    assert found[0].evidence["lr"] == 0.1 and found[0].evidence["stable_lr"] == pytest.approx(0.01)
