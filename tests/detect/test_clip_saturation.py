"""Clip-saturation detector: a climbing clip share is found with its side; a share that is 0 by construction
(num_iterations=1) or healthy noise is not."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation, keys
from keel.detect.clip_saturation import ClipSaturationConfig, ClipSaturationDetector
from tests.detect.rl_series import clips, feed


def test_a_climbing_high_side_warns_then_turns_critical():
    found = feed(ClipSaturationDetector(), clips(0, climb_from=200))
    assert [(f.kind, f.severity) for f in found] == [("clip_saturation", "warning"), ("clip_saturation", "critical")]
    warning, critical = found
    # +0.002 a step from 200 on 0.07: 0.2 near step 265, 0.5 near step 415 (plus the window's lag)
    assert 265 <= warning.step <= 295 and warning.evidence["side"] == "high" and warning.signal == keys.RL_CLIP_HIGH
    assert 410 <= critical.step <= 440


def test_zero_by_construction_is_normal():
    assert feed(ClipSaturationDetector(), clips(0, one_pass=True)) == []


def test_healthy_clipping_finds_nothing():
    assert feed(ClipSaturationDetector(), clips(0)) == []


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), one_pass=st.booleans())
def test_healthy_clipping_finds_nothing_whatever_the_seed(seed, one_pass):
    assert feed(ClipSaturationDetector(), clips(seed, one_pass=one_pass, n=300)) == []


def test_a_run_tuned_to_clip_a_lot_from_the_start_is_not_saturating():
    run = [Observation(step=s, values={keys.RL_CLIP_LOW: 0.1, keys.RL_CLIP_HIGH: 0.15}) for s in range(200)]
    assert feed(ClipSaturationDetector(), run) == []


def test_one_side_alone_is_read():
    run = [Observation(step=s, values={keys.RL_CLIP_LOW: min(0.9, 0.01 * s)}) for s in range(100)]
    found = feed(ClipSaturationDetector(), run)
    assert found and found[0].evidence["side"] == "low"


def test_state_round_trip_mid_episode():
    run = clips(6, climb_from=200)
    expected = [f.to_dict() for f in feed(ClipSaturationDetector(), run)[1:]]
    det = ClipSaturationDetector()
    feed(det, run[:350])
    restored = ClipSaturationDetector()
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert [f.to_dict() for f in feed(restored, run[350:])] == expected


def test_bad_config_names_the_fields():
    with pytest.raises(ValueError, match=r"warn_level=0.6, critical_level=0.5"):
        ClipSaturationConfig(warn_level=0.6)
