"""Dead-groups detector: every group uniform is found, named truncation starvation when responses are cut (trl#5697);
healthy binary-reward runs (many uniform groups, not all) are not."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation, keys
from keel.detect.dead_groups import DeadGroupsConfig, DeadGroupsDetector
from tests.detect.rl_series import feed, groups


def test_groups_going_dead_warn_then_turn_critical():
    found = feed(DeadGroupsDetector(), groups(0, dead_from=300))
    assert [(f.kind, f.severity) for f in found] == [("dead_groups", "warning"), ("dead_groups", "critical")]
    warning, critical = found
    assert 300 <= warning.step <= 315 and 300 <= critical.step <= 335
    assert warning.evidence["onset_step"] >= 290


def test_dead_from_the_first_step_with_truncation_is_truncation_starvation():
    found = feed(DeadGroupsDetector(), groups(0, dead_from=0, truncated=0.97))
    assert [(f.step, f.kind, f.severity) for f in found] == [
        (8, "truncation_starvation", "warning"),
        (23, "truncation_starvation", "critical"),
    ]
    assert found[0].evidence["truncated"] >= 0.9


def test_healthy_groups_find_nothing():
    assert feed(DeadGroupsDetector(), groups(0)) == []


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_healthy_groups_find_nothing_whatever_the_seed(seed):
    assert feed(DeadGroupsDetector(), groups(seed, n=300)) == []


def test_without_the_zero_std_share_it_stays_silent():
    run = [Observation(step=s, values={keys.RL_TRUNCATED: 1.0}) for s in range(100)]
    assert feed(DeadGroupsDetector(), run) == []


def test_state_round_trip_mid_episode():
    run = groups(7, dead_from=300)
    expected = [f.to_dict() for f in feed(DeadGroupsDetector(), run)[1:]]
    det = DeadGroupsDetector()
    feed(det, run[:312])
    restored = DeadGroupsDetector()
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert [f.to_dict() for f in feed(restored, run[312:])] == expected


def test_bad_config_names_the_fields():
    with pytest.raises(ValueError, match=r"warn_level=0.9, critical_level=0.5"):
        DeadGroupsConfig(critical_level=0.5)
