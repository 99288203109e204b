"""The opposing-signals detector: an opposition spike warns only in step with a sharpness or loss spike; healthy
series of all three signals never warn."""

from __future__ import annotations

import json
import math
from pathlib import Path

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


# Derandomized, and without the example database: a statistical detector's false alarms are rare, not impossible.
# Seed 1150 (noise 0.6, sharpening 0.02) draws a 2.6-sigma opposition at step 25 and a 2.05x sharpness jump at 60
# (a low 40 and a high 60): a warning, as the detector is built to give; 0 warnings in 3,600 seeded healthy runs
# (seeds 0-299 of every noise/sharpening pair below). With random seeds the test could fail on any run (it did here).
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    opposition_noise=st.sampled_from([0.1, 0.3, 0.6, 1.0]),  # 1.0: the log-scale noise of a real run (below)
    sharpening=st.sampled_from([0.0, 0.005, 0.02]),
)
def test_healthy_series_never_warn_whatever_the_seed(seed, opposition_noise, sharpening):
    assert found(series(seed, opposition_noise=opposition_noise, sharpening=sharpening)) == []


def test_an_opposition_rise_of_a_few_times_a_noisy_baseline_with_a_sharpness_spike_warns():
    # on real runs the opposition's log-scale noise is ~1 (a robust sd of 1.04 on the spiky run below); sharpness
    # spikes came with 3-7x its median, which a z of 4 (~60x) never reached
    obs = series(6, spike_at=200, loss_spike=False, sharpness_spike=True, opposition_noise=1.0)
    obs[200].values[keys.OPPOSING_OPPOSITION] = 0.05 * 6
    (f,) = found(obs)
    assert (f.step, f.evidence["coincides_with"]) == (200, "sharpness") and 4 < f.evidence["ratio"] < 10


def test_one_sharpness_spike_backs_one_warning_not_every_opposition_spike_near_it():
    obs = series(7, spike_at=200, loss_spike=False, sharpness_spike=True)
    obs[240].values[keys.OPPOSING_OPPOSITION] = 1.0  # a second episode 40 steps later, calm measurements between
    assert [f.evidence["opposition_step"] for f in found(obs)] == [200]


def recorded_run(name: str) -> list[Observation]:
    """A real run's loss (every step), sharpness and opposition (every 10 steps), from
    data/opposing_sharpness_runs.json: an MLP on synthetic images whose "sky" feature points to class 0 for one
    group and against it for another (Rosenberg & Risteski's setting), SGD at LR 0.5 (sharpness spikes 3-30x
    above 2/LR) or 0.005 (healthy: progressive sharpening, no spike); /work/notes/h18-L-scripts/exp.py."""
    run = json.loads((Path(__file__).parent / "data" / "opposing_sharpness_runs.json").read_text())[name]
    names = {"loss": keys.LOSS, "sharpness": keys.CURVATURE_SHARPNESS, "opposition": keys.OPPOSING_OPPOSITION}
    steps = sorted({int(s) for series in run.values() for s in series})
    return [Observation(step=s, values={names[k]: v[str(s)] for k, v in run.items() if str(s) in v}) for s in steps]


def test_on_a_real_run_the_warnings_coincide_with_its_sharpness_spikes_and_a_healthy_run_has_none():
    obs = recorded_run("spiky_lr0.5_seed0")
    sharpness = [(o.step, o.values[keys.CURVATURE_SHARPNESS]) for o in obs if keys.CURVATURE_SHARPNESS in o.values]
    spikes = {s for i, (s, x) in enumerate(sharpness) if i >= 3 and x >= 2 * max(v for _, v in sharpness[i - 3 : i])}
    with_sharpness = [f.evidence["coincident_step"] for f in found(obs) if f.evidence["coincides_with"] == "sharpness"]
    assert len(with_sharpness) >= 2 and set(with_sharpness) <= spikes, (with_sharpness, spikes)
    assert found(recorded_run("healthy_lr0.005_seed0")) == []


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
