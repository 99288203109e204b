"""Length-explosion detector: lengths racing to the limit and truncation rising are found; slow healthy growth and a
run truncated from its first step (starvation, not explosion) are not."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation, keys
from keel.detect.length_explosion import LengthExplosionConfig, LengthExplosionDetector
from tests.detect.rl_series import feed, lengths


def test_lengths_racing_to_the_limit_warn_then_turn_critical():
    found = feed(LengthExplosionDetector(), lengths(0, explode_from=200))
    assert [(f.kind, f.severity) for f in found] == [("length_explosion", "warning"), ("length_explosion", "critical")]
    warning, critical = found
    # +4 tokens a step from 200: 70 % of the 1024 limit near step 300, 80 % truncated near step 370
    assert 290 <= warning.step <= 330 and warning.evidence["limit"] == 1024  # inferred from the cut responses
    assert 350 <= critical.step <= 400 and critical.evidence["truncated_now"] >= 0.8
    assert critical.step - warning.step >= 30


def test_a_given_limit_is_used_before_any_response_is_cut():
    run = [
        Observation(step=o.step, values={keys.RL_LENGTH_MEAN: o.values[keys.RL_LENGTH_MEAN]})
        for o in lengths(0, explode_from=200)
    ]
    assert feed(LengthExplosionDetector(), run) == []  # no limit known, no truncation logged: nothing to judge
    found = feed(LengthExplosionDetector(max_length=1024), run)
    assert [f.severity for f in found] == ["warning"] and found[0].signal == keys.RL_LENGTH_MEAN


def test_healthy_lengths_find_nothing():
    assert feed(LengthExplosionDetector(), lengths(0)) == []


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_healthy_lengths_find_nothing_whatever_the_seed(seed):
    assert feed(LengthExplosionDetector(), lengths(seed, n=300)) == []


def test_truncated_from_the_first_step_is_not_an_explosion():
    run = [Observation(step=s, values={keys.RL_LENGTH_MEAN: 256.0, keys.RL_TRUNCATED: 0.98}) for s in range(200)]
    assert feed(LengthExplosionDetector(), run) == []


def test_state_round_trip_mid_episode():
    run = lengths(5, explode_from=200)
    expected = [f.to_dict() for f in feed(LengthExplosionDetector(), run)[1:]]
    det = LengthExplosionDetector()
    feed(det, run[:340])
    restored = LengthExplosionDetector()
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert [f.to_dict() for f in feed(restored, run[340:])] == expected


@pytest.mark.parametrize(("field", "value"), [("near_limit", 0.0), ("critical_truncated", 1.5), ("max_length", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"LengthExplosionConfig.{field}="):
        LengthExplosionConfig(**{field: value})
