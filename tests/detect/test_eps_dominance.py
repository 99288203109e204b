"""ε-dominance: named when most of Adam's elements have √v̂ < ε and the update RMS has collapsed; silent otherwise."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel._core import Observation, keys
from keel.detect import default_detectors
from keel.detect.eps_dominance import EpsDominanceConfig, EpsDominanceDetector
from keel.guard import Guard
from keel.signals import AdamEpsProbe

CADENCE = 50  # the probe's default


def trace(points, per_param=None):
    """Observations at the probe's cadence from (eps_dominated, update_rms) pairs."""
    return [
        Observation(
            step=CADENCE * i,
            values={keys.ADAM_EPS_DOMINATED: share, keys.ADAM_UPDATE_RMS: rms},
            per_param={keys.ADAM_EPS_DOMINATED_PER_PARAM: per_param} if per_param else {},
        )
        for i, (share, rms) in enumerate(points)
    ]


def feed(det, observations):
    return [f for o in observations for f in det.update(o)]


def test_a_collapse_is_a_warning_after_two_measurements_then_critical():
    points = [(0.0, 0.25)] * 4 + [(0.6, 0.08)] * 3 + [(0.95, 0.04)] * 2
    found = feed(EpsDominanceDetector(), trace(points))
    assert [(f.step, f.kind, f.severity) for f in found] == [
        (250, "eps_dominance", "warning"),
        (350, "eps_dominance", "critical"),
    ]
    assert found[0].evidence["onset_step"] == 200 and found[0].evidence["update_rms_before"] == 0.25
    assert "1e-15" in found[0].advice  # the cause catalogue's advice: Wortsman et al.'s smaller ε


def test_either_half_of_the_symptom_alone_is_not_flagged():
    det = EpsDominanceDetector()
    assert feed(det, trace([(0.9, 0.3)] * 10)) == []  # many tiny-v elements, but the update is the gradient's
    assert feed(EpsDominanceDetector(), trace([(0.0, 0.01)] * 10)) == []  # a small update that ε did not cause


def test_it_names_the_most_dominated_parameters():
    per_param = (("emb.weight", "head.weight", "blocks.0.w"), [0.99, 0.2, math.nan])
    found = feed(EpsDominanceDetector(), trace([(0.9, 0.02)] * 2, per_param))
    assert found[0].evidence["parameters"] == {"emb.weight": 0.99, "head.weight": 0.2}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 0.49), st.floats(0.0, 10.0)) | st.tuples(st.floats(0.0, 1.0), st.floats(0.101, 10.0)),
        max_size=20,
    )
)
def test_no_measurement_below_either_threshold_is_ever_flagged(points):
    assert feed(EpsDominanceDetector(), trace(points)) == []


def test_silent_while_its_keys_are_absent():
    det = EpsDominanceDetector()
    for step in range(200):
        assert det.update(Observation(step=step, values={keys.LOSS: 2.0, keys.ADAM_EPS_DOMINATED: 1.0})) == []
        assert det.update(Observation(step=step, values={keys.ADAM_UPDATE_RMS: 0.0})) == []
        assert (
            det.update(Observation(step=step, values={keys.ADAM_EPS_DOMINATED: math.nan, keys.ADAM_UPDATE_RMS: 0.0}))
            == []
        )


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"min_fraction": 0.0}, "min_fraction"),
        ({"min_fraction": 0.95}, "critical_fraction"),
        ({"critical_fraction": 1.5}, "critical_fraction"),
        ({"max_update_rms": 0.0}, "max_update_rms"),
        ({"max_update_rms": math.inf}, "max_update_rms"),
        ({"patience": 0}, "patience"),
        ({"patience": "2"}, "patience"),
    ],
)
def test_bad_config_is_refused_naming_the_field(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EpsDominanceConfig(**fields)


def test_a_default_detector_whose_probe_is_opt_in_so_it_reads_nothing_by_default():
    from keel.signals.registry import DEFAULT_PROBES, FULL_PROBES

    assert "adam_eps" not in DEFAULT_PROBES and "adam_eps" in FULL_PROBES
    assert "eps_dominance" in [d.name for d in default_detectors()]


class _Rms:
    name = "update_rms"

    def __init__(self):
        self.values = []

    def update(self, obs):
        if keys.ADAM_UPDATE_RMS in obs.values:
            self.values.append(obs.values[keys.ADAM_UPDATE_RMS])
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _train(eps, grad_scale, steps=30):
    """A small regression trained with AdamW whose gradients are ``grad_scale`` times the loss's, under a `Guard`
    with the Adam ε probe (every step) and the ε-dominance detector: what a user adds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=eps)
    rms = _Rms()
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    with Guard(
        model, opt, policy="observe", probes=[AdamEpsProbe(every=1)], detectors=[EpsDominanceDetector(), rms]
    ) as guard:
        for _ in range(steps):
            loss = (model(x) - y).pow(2).mean()
            (loss * grad_scale).backward()
            guard.step(loss)
            opt.zero_grad()
    return [f for f in guard.findings if f.kind == "eps_dominance"], rms.values


def test_tiny_gradients_under_adams_default_eps_are_found_and_a_smaller_eps_clears_them():
    found, rms = _train(eps=1e-8, grad_scale=1e-8)
    assert [(f.step, f.severity) for f in found] == [(2, "critical")]  # measured from step 1: two in a row
    fixed, fixed_rms = _train(eps=1e-15, grad_scale=1e-8)
    assert fixed == []
    assert min(fixed_rms) > 10 * max(rms[1:])  # the update RMS recovers with Wortsman et al.'s ε
