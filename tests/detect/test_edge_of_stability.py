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


# The zoo's lr_spike, seed 1 (`keel bench detect --only lr_spike --seed 1`): the margins its sharpness probe measured
# (AdamW, every 50 steps and at the LR jump) and the largest LR of each step. At step 150 the LR is 30× the schedule:
# the margin is 1.85 — beyond the edge, 9.7× the smallest positive recent one — and the loss jumps only after this
# step's update (2.45 at step 150, 3.52 at 151), so the run crossed the edge before it diverged.
LR_SPIKE_SEED_1 = [
    (2, 698.329, 0.00045),  # Adam's first steps: v̂ from a handful of gradients
    (6, -78.886, 0.00105),  # recorded with the old power iteration, which landed on a negative eigenvalue
    (14, 0.326, 0.00225),
    (50, 0.207, 0.0028529),
    (100, 0.191, 0.0020672),
    (150, 1.849, 0.0311134),  # the LR jump, measured before its first update
]


def test_an_lr_spike_from_deep_inside_the_stable_region_to_beyond_the_edge_warns():
    det = EdgeOfStabilityDetector()
    found = [f for s, m, lr in LR_SPIKE_SEED_1 for f in det.update(obs(s, m, lr=lr))]
    assert [(f.step, f.severity) for f in found] == [(150, "warning")]
    assert found[0].evidence["typical_margin"] == 0.191


def test_a_negative_margin_is_not_the_typical_one_a_rise_is_judged_against():
    # a margin creeping up to 2.1 from 1.5 is progressive sharpening, also when one noisy measurement was negative
    det = EdgeOfStabilityDetector()
    margins = [1.5, 1.8, -0.5, 2.1]
    assert [f for i, m in enumerate(margins) for f in det.update(obs(50 * i, m))] == []


def test_a_margin_short_of_the_edge_never_warns_however_sudden():
    det = EdgeOfStabilityDetector()
    assert [f for i, m in enumerate([0.05, 0.04, 0.9]) for f in det.update(obs(50 * i, m))] == []


def test_a_leap_below_the_jump_is_refused_with_its_allowed_values():
    with pytest.raises(ValueError, match=r"leap=2.0; allowed: a finite number >= jump \(3.0\)"):
        EdgeOfStabilityConfig(leap=2.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_zoo_lr_spike_is_named_edge_of_stability_at_the_jump(seed):
    from keel.harness.bench.detect import score_scenario  # noqa: PLC0415  (the harness, only for this slow run)

    score = score_scenario("lr_spike", seed=seed)
    assert score.passed and (score.kind, score.step) == ("edge_of_stability", 150), score
