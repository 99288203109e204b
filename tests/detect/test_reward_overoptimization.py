"""Reward-over-optimisation detector: disagreement rising before the gold reward peaks (lead time), the gold reward
falling while the proxy rises, silence on healthy runs and when only the proxy is logged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation, keys
from keel.detect.reward_overoptimization import RewardOverOptimizationConfig, RewardOverOptimizationDetector
from tests.detect.rl_series import feed, rewards


def without(run, *dropped):
    return [Observation(step=o.step, values={k: v for k, v in o.values.items() if k not in dropped}) for o in run]


def test_rising_disagreement_warns_before_the_gold_reward_peaks_when_asked_to():
    run = without(rewards(0, spread_from=150, gold_peak=350), keys.RL_GOLD_REWARD)
    found = feed(RewardOverOptimizationDetector(disagreement=True), run)
    assert found and found[0].kind == "reward_overoptimization" and found[0].severity == "warning"
    assert found[0].evidence["by"] == "disagreement" and found[0].signal == keys.RM_DISAGREEMENT
    assert 200 <= found[0].step < 350  # lead time before the gold reward (not shown to the detector) turns


def _steady_rise(seed: int, *, rate: float, noise: float, n: int = 200) -> list[Observation]:
    """The shape of `keel bench rl`'s run: the proxy climbing, disagreement flat for 40 steps then rising ``rate`` of
    its start per step (×``exp(noise·N(0,1))``), the gold reward peaking at step 120 (1.8× the start) and falling."""
    rng, t = np.random.default_rng(seed), np.arange(n)
    proxy = 2.0 * np.log1p(t / 20) + 0.1 * rng.standard_normal(n)
    spread = (1 + rate * np.maximum(0, t - 40)) * np.exp(noise * rng.standard_normal(n))
    gold = np.log1p(np.minimum(t, 120) / 30) - 0.01 * np.maximum(0, t - 120) + 0.02 * rng.standard_normal(n)
    return [
        Observation(
            step=int(i),
            values={keys.RL_REWARD_MEAN: proxy[i], keys.RM_DISAGREEMENT: spread[i], keys.RL_GOLD_REWARD: gold[i]},
        )
        for i in t
    ]


def test_a_steady_rise_in_disagreement_warns_before_the_gold_peak_without_doubling_first():
    # at the gold peak the disagreement is 1.8x its start: a x2 ratio rule warned only after the peak (by the gold)
    found = feed(RewardOverOptimizationDetector(disagreement=True), _steady_rise(0, rate=0.01, noise=0.05))
    assert found and found[0].severity == "warning" and found[0].evidence["by"] == "disagreement"
    assert 40 < found[0].step < 120


def test_a_significant_but_negligible_drift_in_disagreement_is_not_a_warning():
    # +4 % over the run with 0.1 % noise: every trend is many standard errors, the effect is below rise_factor
    run = without(_steady_rise(0, rate=0.00025, noise=0.001), keys.RL_GOLD_REWARD)
    assert feed(RewardOverOptimizationDetector(disagreement=True), run) == []
    assert feed(
        RewardOverOptimizationDetector(disagreement=True),
        without(_steady_rise(0, rate=0.01, noise=0.05), keys.RL_GOLD_REWARD),
    )


def test_a_falling_gold_reward_is_found_and_critical_below_its_start():
    run = without(rewards(0, gold_peak=250), keys.RM_DISAGREEMENT)
    found = feed(RewardOverOptimizationDetector(), run)
    assert [(f.severity, f.evidence["by"]) for f in found][:1] == [("warning", "gold")]
    assert 250 < found[0].step <= 330
    # from 1.06 at step 150 the gold reward falls 0.006/step: below its start (~0.05) near step 320, and the window's
    # median follows ~15 steps later
    run = without(rewards(0, gold_peak=150), keys.RM_DISAGREEMENT)
    severities = [(f.step, f.severity) for f in feed(RewardOverOptimizationDetector(), run)]
    assert [s for _, s in severities] == ["warning", "critical"] and 320 <= severities[1][0] <= 380


def test_healthy_rewards_find_nothing():
    assert feed(RewardOverOptimizationDetector(), rewards(0)) == []
    assert feed(RewardOverOptimizationDetector(disagreement=True), rewards(0)) == []


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_healthy_rewards_find_nothing_whatever_the_seed(seed):
    assert feed(RewardOverOptimizationDetector(disagreement=True), rewards(seed, n=300)) == []


def test_a_rising_proxy_alone_is_what_training_is_for():
    run = without(rewards(0, spread_from=150, gold_peak=200), keys.RM_DISAGREEMENT, keys.RL_GOLD_REWARD)
    assert feed(RewardOverOptimizationDetector(), run) == []


def test_the_ensemble_mean_is_the_proxy_without_a_reward_mean():
    run = without(rewards(0, spread_from=150), keys.RL_REWARD_MEAN, keys.RL_GOLD_REWARD)
    found = feed(RewardOverOptimizationDetector(disagreement=True), run)
    assert found and found[0].evidence["proxy_signal"] == keys.RM_MEAN


def test_state_round_trip_mid_episode():
    run = rewards(4, spread_from=150, gold_peak=300)
    expected = [f.to_dict() for f in feed(RewardOverOptimizationDetector(disagreement=True), run)]
    cut = expected[0]["step"] + 1
    det = RewardOverOptimizationDetector(disagreement=True)
    feed(det, run[:cut])
    restored = RewardOverOptimizationDetector()
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert [f.to_dict() for f in feed(restored, run[cut:])] == expected[1:]


def test_bad_config_names_the_fields():
    with pytest.raises(ValueError, match=r"rise_factor=1.0, critical_factor=4.0"):
        RewardOverOptimizationConfig(rise_factor=1.0)


def test_the_healthy_series_ci_found_warning_under_rise_factor_1_1_stays_silent():
    # hypothesis found seed 9805 (disagreement drifting up 20 % by design, as healthy runs do) warning under 1.1
    assert feed(RewardOverOptimizationDetector(disagreement=True), rewards(9805, n=300)) == []


# --- the unconfirmed-gain rule: the proxy rises, the ensemble's mean follows only part of it ------------------------
def _followed(seed: int, *, share: float, n: int = 150, noise: float = 0.15) -> list[Observation]:
    """The shape of `keel bench rl`'s over-optimisation runs (standardised members): the proxy (one member) climbing
    ~3 standard units, the ensemble's mean following ``share`` of its rise with noise of its own, disagreement flat
    (so only the new rule can speak), the gold reward peaking at step 60 and falling."""
    rng, t = np.random.default_rng(seed), np.arange(n)
    clean = 3.0 * np.log1p(t / 30)
    proxy = clean + noise * rng.standard_normal(n)
    ensemble = share * clean + noise * rng.standard_normal(n)
    spread = 0.5 * np.exp(0.05 * rng.standard_normal(n))
    gold = 0.5 * np.log1p(np.minimum(t, 60) / 20) - 0.01 * np.maximum(0, t - 60) + 0.05 * rng.standard_normal(n)
    return [
        Observation(
            step=int(i),
            values={
                keys.RL_REWARD_MEAN: proxy[i],
                keys.RM_MEAN: ensemble[i],
                keys.RM_DISAGREEMENT: spread[i],
                keys.RL_GOLD_REWARD: gold[i],
            },
        )
        for i in t
    ]


def test_a_rising_disagreement_alone_is_not_a_warning_by_default():
    # on `keel bench rl`'s runs GRPO trained on the gold reward itself raised the disagreement as much (seed 1: 3-4x
    # its start by step ~40, the gold reward rising throughout) as training on one proxy did
    assert (
        feed(RewardOverOptimizationDetector(), without(_steady_rise(0, rate=0.01, noise=0.05), keys.RL_GOLD_REWARD))
        == []
    )


def test_a_proxy_gain_the_ensemble_does_not_confirm_warns_before_the_gold_peak():
    # the ensemble follows 60 % of the proxy's rise (the real runs: 57-70 %) while its disagreement stays flat; the
    # disagreement rule is silent here, and the gold reward, hidden, would speak only after its peak
    found = feed(RewardOverOptimizationDetector(), without(_followed(0, share=0.6), keys.RL_GOLD_REWARD))
    assert found and found[0].severity == "warning" and found[0].evidence["by"] == "unconfirmed"
    assert found[0].signal == keys.RM_MEAN and 0.2 <= found[0].evidence["unconfirmed_share"] < 0.4
    assert found[0].step < 60


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), share=st.floats(0.9, 1.5))
def test_an_ensemble_that_follows_the_proxy_is_silent_whatever_the_seed(seed, share):
    # it confirms at least 90 % of the gain (or more than all of it): the gold reward, shown, peaks, but the ensemble
    # part of the rule must not speak before it
    run = without(_followed(seed, share=share), keys.RL_GOLD_REWARD)
    assert feed(RewardOverOptimizationDetector(), run) == []


def test_a_proxy_that_is_the_ensemble_mean_has_no_unconfirmed_gain():
    run = [
        Observation(step=o.step, values={**o.values, keys.RL_REWARD_MEAN: o.values[keys.RM_MEAN]})
        for o in without(_followed(0, share=0.6), keys.RL_GOLD_REWARD)
    ]
    assert feed(RewardOverOptimizationDetector(), run) == []


def test_bad_unconfirmed_share_names_the_field():
    with pytest.raises(ValueError, match=r"unconfirmed_share=0"):
        RewardOverOptimizationConfig(unconfirmed_share=0)


def test_a_rising_gold_reward_whose_window_dips_by_chance_is_not_a_fall():
    # 1 of 200 healthy synthetic series (this seed) warned by the gold rule at step 285: the window's slope read -4.8
    # standard errors while its median (1.53) was the best the gold reward had reached — a dip of the slope only
    assert feed(RewardOverOptimizationDetector(), rewards(1838952519, n=300)) == []


def _two_unconfirmed_episodes(seed: int = 0, n: int = 300) -> list[Observation]:
    """The ensemble follows half the proxy's rise, catches up between steps 100 and 160, then falls from step 200;
    the disagreement grows 3x over the run."""
    rng, t = np.random.default_rng(seed), np.arange(n)
    proxy = 0.05 * t
    lag = 0.025 * np.minimum(t, 100) - 2.5 * np.clip((t - 100) / 60, 0, 1) + 0.1 * np.maximum(0, t - 200)
    spread = 0.5 + 0.004 * t
    noisy = [x + 0.02 * rng.standard_normal(n) for x in (proxy, proxy - lag)]
    return [
        Observation(
            step=int(i),
            values={keys.RL_REWARD_MEAN: noisy[0][i], keys.RM_MEAN: noisy[1][i], keys.RM_DISAGREEMENT: spread[i]},
        )
        for i in t
    ]


def test_an_unconfirmed_gain_that_the_ensemble_catches_up_on_ends_its_episode_whatever_the_disagreement():
    # the disagreement rule is off by default, so its level must not hold an episode open (failed before: the
    # second unconfirmed gain, from step 200, was not reported)
    found = feed(RewardOverOptimizationDetector(), _two_unconfirmed_episodes())
    assert [(f.severity, f.evidence["by"]) for f in found] == [("warning", "unconfirmed")] * 2
    assert found[0].step < 100 < 200 < found[1].step


def test_a_healthy_series_whose_gap_is_noisy_early_is_silent():
    # hypothesis found it: the ensemble follows 91 % of the proxy's rise, but early in the run, with a small rise, the
    # noisy gap read as a 0.39 share; judged in the gap's noise (share_z) it is not unconfirmed
    run = without(_followed(12001, share=0.90625), keys.RL_GOLD_REWARD)
    assert feed(RewardOverOptimizationDetector(), run) == []
    assert feed(RewardOverOptimizationDetector(share_z=1e-9), run) != []  # as a point estimate it warned
