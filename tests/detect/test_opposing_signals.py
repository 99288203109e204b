"""The opposing-signals detector: an opposition spike warns only in step with a sharpness or loss spike; healthy
series of all three signals never warn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation, keys
from keel.detect import OpposingSignalsDetector, OpposingSignalsDetectorConfig


def series(
    seed: int,
    *,
    n: int = 300,
    spike_at: int | None = None,
    loss_spike: bool = True,
    sharpness_spike: bool = False,
    partner_at: int | None = None,
    opposition_noise: float = 0.3,
    sharpening: float = 0.0,
) -> list[Observation]:
    """A healthy run: a decaying loss every step, the probe's opposition every 5 steps, sharpness every 20 (growing
    by ``sharpening`` per step, progressive sharpening). With ``spike_at`` the opposition jumps there, and the loss
    (``loss_spike``) or sharpness (``sharpness_spike``) spikes at ``partner_at`` (default: the same step)."""
    rng = np.random.default_rng(seed)
    partner_at = spike_at if partner_at is None else partner_at
    out = []
    for s in range(n):
        values = {keys.LOSS: float((2.0 + 3.0 * math.exp(-s / 60)) * math.exp(0.02 * rng.standard_normal()))}
        if s % 5 == 0:
            values[keys.OPPOSING_OPPOSITION] = float(0.05 * math.exp(opposition_noise * rng.standard_normal()))
            values[keys.OPPOSING_ANTIPHASE] = float(rng.uniform(-0.5, 1.0))
            values[keys.OPPOSING_ROSE] = float(rng.uniform(0.2, 0.5))
        if s % 20 == 0 or (sharpness_spike and s == partner_at):
            values[keys.CURVATURE_SHARPNESS] = float(10 * (1 + sharpening * s) * math.exp(0.1 * rng.standard_normal()))
        if spike_at is not None and s == spike_at:
            values.update({keys.OPPOSING_OPPOSITION: 1.0, keys.OPPOSING_ANTIPHASE: -0.95, keys.OPPOSING_ROSE: 0.5})
        if spike_at is not None and s == partner_at:
            if loss_spike:
                values[keys.LOSS] *= 4.0
            if sharpness_spike:
                values[keys.CURVATURE_SHARPNESS] = 80.0
        out.append(Observation(step=s, values=values))
    return out


def found(observations, **fields):
    det = OpposingSignalsDetector(**fields)
    return [f for o in observations for f in det.update(o)]


def test_an_opposition_spike_with_a_loss_spike_warns_once_naming_both():
    (f,) = found(series(0, spike_at=200))
    assert (f.kind, f.severity, f.step, f.signal) == ("opposing_signals", "warning", 200, keys.OPPOSING_OPPOSITION)
    e = f.evidence
    assert (e["coincides_with"], e["coincident_step"], e["opposition_step"]) == ("loss", 200, 200)
    assert e["ratio"] > 10 and e["antiphase"] == -0.95 and e["rose"] == 0.5
    assert "opposite directions" in f.cause and f.advice
    json.dumps(e)


def test_an_opposition_spike_with_a_sharpness_spike_warns():
    (f,) = found(series(1, spike_at=200, loss_spike=False, sharpness_spike=True, partner_at=230))
    assert (f.step, f.evidence["coincides_with"], f.evidence["coincident_step"]) == (230, "sharpness", 230)


def test_a_loss_spike_before_the_opposition_spike_coincides_too():
    (f,) = found(series(2, spike_at=200, partner_at=150))
    assert (f.step, f.evidence["coincident_step"]) == (200, 150)


@pytest.mark.parametrize(
    ("what", "kwargs"),
    [
        ("an opposition spike alone", {"spike_at": 200, "loss_spike": False}),
        ("a loss spike alone", {"spike_at": 200, "partner_at": 202, "n": 200}),  # the opposition spike never comes
        ("a loss spike further away than `within`", {"spike_at": 200, "partner_at": 60}),
    ],
)
def test_no_warning_without_a_coincidence(what, kwargs):
    assert found(series(4, **kwargs)) == [], what


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    opposition_noise=st.sampled_from([0.1, 0.3, 0.6]),
    sharpening=st.sampled_from([0.0, 0.005, 0.02]),
)
def test_healthy_series_never_warn_whatever_the_seed(seed, opposition_noise, sharpening):
    assert found(series(seed, opposition_noise=opposition_noise, sharpening=sharpening)) == []


def test_state_round_trip_mid_episode_gives_the_same_warning():
    obs = series(5, spike_at=200, partner_at=230, loss_spike=False, sharpness_spike=True)
    whole = found(obs)
    det = OpposingSignalsDetector()
    for o in obs[:215]:
        det.update(o)
    restored = OpposingSignalsDetector()
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert [f for o in obs[215:] for f in restored.update(o)] == whole != []


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"window": 0}, "window=0"),
        ({"min_ratio": 1.0}, "min_ratio=1.0"),
        ({"sharpness_ratio": math.inf}, "sharpness_ratio=inf"),
        ({"within": -1}, "within=-1"),
        ({"z": 0}, "z"),
        ({"min_history": 30}, "min_history=30"),
    ],
)
def test_bad_config_names_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        OpposingSignalsDetectorConfig(**fields)
