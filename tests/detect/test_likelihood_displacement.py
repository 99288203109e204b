"""Likelihood-displacement detector: found with its onset and lead time on a falling chosen log-prob, silent on
healthy DPO runs and without a margin."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation, keys
from keel.detect.likelihood_displacement import LikelihoodDisplacementConfig, LikelihoodDisplacementDetector
from tests.detect.rl_series import dpo, feed


def test_a_falling_chosen_log_prob_with_a_rising_margin_is_found_early_then_critical():
    found = feed(LikelihoodDisplacementDetector(), dpo(0, fall_from=150))
    assert [(f.kind, f.severity) for f in found] == [
        ("likelihood_displacement", "warning"),
        ("likelihood_displacement", "critical"),
    ]
    warning, critical = found
    # falls 0.004 nats/token/step from step 150: a 0.05 drop in the window median ~25 steps later, + patience
    assert 170 <= warning.step <= 200 and warning.evidence["onset_step"] <= warning.step
    assert warning.signal == keys.PREF_CHOSEN_DISPLACEMENT and warning.evidence["per_token"] is True
    # critical at a 1-nat drop (step ~150 + 250 + the window's lag); the warning came ~230 steps before it
    assert 400 <= critical.step <= 430
    assert critical.step - warning.step >= 200
    assert abs(warning.evidence["projected_critical_step"] - critical.step) <= 80


def test_a_summed_log_prob_alone_only_warns():
    run = [
        Observation(step=o.step, values={keys.PREF_CHOSEN_LOGP: o.values[keys.PREF_CHOSEN_LOGP], keys.PREF_MARGIN: m})
        for o, m in ((o, o.values[keys.PREF_MARGIN]) for o in dpo(0, fall_from=150))
    ]
    found = feed(LikelihoodDisplacementDetector(), run)
    assert [(f.severity, f.signal) for f in found] == [("warning", keys.PREF_CHOSEN_LOGP)]


def test_healthy_dpo_finds_nothing():
    assert feed(LikelihoodDisplacementDetector(), dpo(0)) == []


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_healthy_dpo_finds_nothing_whatever_the_seed(seed):
    assert feed(LikelihoodDisplacementDetector(), dpo(seed, n=300)) == []


def test_without_a_margin_it_stays_silent():
    run = [Observation(step=o.step, values={keys.PREF_CHOSEN_LOGP: o.values[keys.PREF_CHOSEN_LOGP]}) for o in dpo(0)]
    det = LikelihoodDisplacementDetector()
    before = det.state_dict()
    assert feed(det, run) == [] and det.state_dict() == before


def test_a_chosen_log_prob_falling_with_the_margin_is_not_displacement():
    run = dpo(0, fall_from=150)
    for o in run:  # the margin falls too: the run is getting worse, not displacing
        o.values[keys.PREF_MARGIN] = -0.002 * o.step
    assert feed(LikelihoodDisplacementDetector(), run) == []


def test_state_round_trip_mid_episode():
    run = dpo(1, fall_from=150)
    whole = LikelihoodDisplacementDetector()
    expected = [f.to_dict() for f in feed(whole, run)[1:]]
    det = LikelihoodDisplacementDetector()
    feed(det, run[:250])
    restored = LikelihoodDisplacementDetector()
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert [f.to_dict() for f in feed(restored, run[250:])] == expected


@pytest.mark.parametrize(
    ("field", "value"), [("window", 2), ("z", 0.0), ("min_drop", -1.0), ("patience", 0), ("critical_drop", "1")]
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"LikelihoodDisplacementConfig.{field}="):
        LikelihoodDisplacementConfig(**{field: value})


def test_under_trl_the_chosen_reward_is_read_before_the_noisy_summed_log_prob():
    # TRL logs rewards/chosen (β·summed log-ratio to the reference) and logps/chosen (summed log-prob, whose
    # batch-to-batch spread of whole responses hides a slow fall): the quiet log-ratio is the one judged.
    import numpy as np

    rng = np.random.default_rng(0)
    run = []
    for o in dpo(0, fall_from=150):
        ratio = 20 * o.values[keys.PREF_CHOSEN_DISPLACEMENT]  # summed over a 20-token response
        values = {
            keys.PREF_CHOSEN_REWARD: 0.1 * ratio,
            keys.PREF_CHOSEN_LOGP: -30 + ratio + 8 * rng.standard_normal(),  # another batch, another length
            keys.PREF_MARGIN: o.values[keys.PREF_MARGIN],
        }
        run.append(Observation(step=o.step, values=values))
    found = feed(LikelihoodDisplacementDetector(), run)
    assert [(f.severity, f.signal) for f in found] == [("warning", keys.PREF_CHOSEN_REWARD)]
    assert 170 <= found[0].step <= 220
    noisy_only = [
        Observation(step=o.step, values={k: v for k, v in o.values.items() if k != keys.PREF_CHOSEN_REWARD})
        for o in run
    ]
    late = feed(LikelihoodDisplacementDetector(), noisy_only)  # what the summed log-prob alone gives
    assert all(f.step >= found[0].step + 100 for f in late)
