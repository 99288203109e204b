"""Evaluation stability (BOSE): monotonicity over checkpoints, rank τ under a paired bootstrap, the tracker."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel._core.rank_correlation import kendall_tau_b
from keel.detect.eval_stability import (
    NOISE_FLOOR_RANK_TAU,
    NOISY_RANK_TAU,
    EvalStability,
    EvalStabilityConfig,
    _taus_against,
    monotonicity,
    rank_stability,
)


def test_monotonicity_of_constructed_sequences():
    assert monotonicity([0.1, 0.2, 0.3, 0.4]) == 1.0
    assert monotonicity([4.0, 3.0, 2.0, 1.0], goal="min") == 1.0  # a falling loss improves at every checkpoint
    assert monotonicity([4.0, 3.0, 2.0, 1.0]) == -1.0
    # by hand: order 0..4 vs 1,3,2,5,4 — 10 pairs, discordant (1,2) and (3,4): (8 − 2) / 10
    assert monotonicity([1, 3, 2, 5, 4]) == pytest.approx(0.6)
    # a plateau: 1,2,2,2 — x orders 6 pairs, y orders 3 (all concordant): 3 / √18
    assert monotonicity([1, 2, 2, 2]) == pytest.approx(3 / math.sqrt(18))
    assert math.isnan(monotonicity([0.5, 0.5, 0.5]))


def test_monotonicity_refuses_an_unknown_goal_naming_it():
    with pytest.raises(ValueError, match="goal='up'; allowed: 'max' or 'min'"):
        monotonicity([1, 2], goal="up")  # type: ignore[arg-type]


def _reference_rank_tau(table: np.ndarray, resamples: int, seed: int) -> list[float]:
    """Independent of rank_stability's matmul: index the examples of each resample and average, τ by scipy."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, table.shape[1], size=(resamples, table.shape[1]))
    full = table.mean(axis=1)
    return [scipy.stats.kendalltau(table[:, d].mean(axis=1), full).statistic for d in draws]


def test_rank_stability_matches_an_indexing_bootstrap_with_scipy_tau():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(6, 40)) + np.linspace(0, 0.3, 6)[:, None]
    got = rank_stability(table, resamples=50, seed=11)
    expected = _reference_rank_tau(table, 50, 11)
    assert got.tau_mean == pytest.approx(np.mean(expected), abs=1e-12)
    assert got.tau_std == pytest.approx(np.std(expected), abs=1e-12)
    assert (got.checkpoints, got.examples, got.resamples) == (6, 40, 50)


def test_rank_stability_separates_a_rankable_eval_from_a_noisy_one():
    rng = np.random.default_rng(0)
    steady = rng.normal(scale=0.1, size=(8, 200)) + np.arange(8)[:, None] * 0.1  # checkpoints 0.1 apart, SE 0.007
    noisy = rng.normal(scale=1.0, size=(8, 200)) + np.arange(8)[:, None] * 0.01  # 0.01 apart, SE 0.07
    assert rank_stability(steady, seed=0).tau_mean > 0.99
    assert rank_stability(noisy, seed=0).tau_mean < NOISY_RANK_TAU


def _simulated(ratio: float, seed: int) -> tuple[float, float]:
    """(rank τ, τ of the full-data ranking vs the true one) for 8 checkpoints × 200 normal per-example scores whose
    true means spread ``ratio`` times the variance of a checkpoint's mean."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=8) * math.sqrt(ratio / 200)
    table = rng.normal(size=(8, 200)) + truth[:, None]
    rank = rank_stability(table, resamples=100, seed=seed).tau_mean
    return rank, scipy.stats.kendalltau(table.mean(axis=1), truth).statistic


@pytest.mark.parametrize(("ratio", "rank_tau", "true_tau"), [(0.0, 0.49, None), (0.5, 0.60, 0.51), (2.85, 0.73, 0.75)])
def test_noise_floor_and_threshold_as_documented(ratio, rank_tau, true_tau):
    # the figures NOISY_RANK_TAU's comment quotes (20 seeds)
    runs = [_simulated(ratio, seed) for seed in range(20)]
    assert np.mean([r for r, _ in runs]) == pytest.approx(rank_tau, abs=0.01)
    if true_tau is not None:
        assert np.mean([t for _, t in runs]) == pytest.approx(true_tau, abs=0.01)
    assert NOISE_FLOOR_RANK_TAU == 0.5


def test_rank_stability_is_seeded_and_drops_examples_with_a_non_finite_score():
    table = np.array([[0.0, 1.0, np.nan, 0.5], [1.0, 2.0, 0.3, 1.5], [2.0, 2.5, 0.1, np.inf]])
    first = rank_stability(table, resamples=30, seed=4)
    assert first == rank_stability(table, resamples=30, seed=4)
    assert first.examples == 2  # columns 2 and 3 hold a NaN / an inf
    assert first == rank_stability(table[:, :2], resamples=30, seed=4)


def test_rank_stability_is_undefined_when_nothing_can_be_ranked():
    assert math.isnan(rank_stability([[1.0, 2.0]]).tau_mean)  # one checkpoint
    assert math.isnan(rank_stability(np.ones((4, 10))).tau_mean)  # every checkpoint ties
    assert math.isnan(rank_stability([[math.nan], [1.0]]).tau_mean)  # no usable example


@pytest.mark.parametrize("bad", [[1.0, 2.0], [[[1.0]]], "abc"])
def test_rank_stability_refuses_what_is_not_a_table(bad):
    with pytest.raises(ValueError):
        rank_stability(bad)


def test_tracker_records_nothing_before_min_checkpoints_then_both_signals():
    tracker = EvalStability(EvalStabilityConfig(resamples=20, min_checkpoints=3))
    rng = np.random.default_rng(1)
    outs = [tracker.observe("mc", 10 * (i + 1), rng.normal(size=30) + i) for i in range(3)]
    assert outs[0] == {} and outs[1] == {}
    assert set(outs[2]) == {keys.EVAL_MONOTONICITY_PER_EVAL + "mc", keys.EVAL_RANK_TAU_PER_EVAL + "mc"}
    assert outs[2][keys.EVAL_MONOTONICITY_PER_EVAL + "mc"] == 1.0


def test_tracker_scalar_evals_get_monotonicity_only_and_goal_min_turns_the_sign():
    tracker = EvalStability()
    out = {}
    for step, loss in enumerate([3.0, 2.0, 2.5, 1.0]):
        out = tracker.observe("val_loss", step, loss, goal="min")
    assert out == {keys.EVAL_MONOTONICITY_PER_EVAL + "val_loss": pytest.approx(4 / 6)}  # 5 conc., 1 disc. of 6


def test_tracker_forgets_checkpoints_undone_by_a_rollback_and_restarts_on_a_new_example_set():
    tracker = EvalStability(EvalStabilityConfig(min_checkpoints=2, resamples=10))
    tracker.observe("a", 10, [0.0, 1.0])
    tracker.observe("a", 20, [5.0, 6.0])
    out = tracker.observe("a", 15, [1.0, 2.0])  # rolled back before step 20: (10, 0.5), (15, 1.5)
    assert out[keys.EVAL_MONOTONICITY_PER_EVAL + "a"] == 1.0
    assert [s for s, _ in tracker.state_dict()["values"]["a"]] == [10, 15]
    out = tracker.observe("a", 30, [0.1, 0.2, 0.3])  # another example set: per-example history starts over
    assert keys.EVAL_RANK_TAU_PER_EVAL + "a" not in out
    assert len(tracker.state_dict()["scores"]["a"]) == 1


def test_tracker_keeps_max_checkpoints_and_round_trips_its_state():
    config = EvalStabilityConfig(max_checkpoints=4, min_checkpoints=3, resamples=15)
    rng = np.random.default_rng(2)
    first, second = EvalStability(config), EvalStability(config)
    for i in range(6):
        first.observe("mc", i, rng.normal(size=12))
    assert len(first.state_dict()["values"]["mc"]) == 4
    second.load_state_dict(first.state_dict())
    vector = rng.normal(size=12)
    assert first.observe("mc", 6, vector) == second.observe("mc", 6, vector)


@pytest.mark.parametrize("bad", [np.zeros((2, 2)), []])
def test_tracker_refuses_scores_that_are_not_a_number_or_a_vector(bad):
    with pytest.raises(ValueError, match="allowed: a number or a 1-d vector"):
        EvalStability().observe("mc", 0, bad)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"resamples": 0}, "resamples=0"),
        ({"min_checkpoints": 1}, "min_checkpoints=1"),
        ({"min_checkpoints": 5, "max_checkpoints": 4}, "min_checkpoints=5; allowed: at most max_checkpoints"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_config_names_the_bad_field(fields, message):
    with pytest.raises(ValueError, match=message):
        EvalStabilityConfig(**fields)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.lists(st.floats(-10, 10), min_size=3, max_size=12), st.sampled_from(["max", "min"]))
def test_tracker_monotonicity_is_bounded_and_agrees_with_the_pure_function(values, goal):
    tracker = EvalStability()
    out = {}
    for step, value in enumerate(values):
        out = tracker.observe("x", step, value, goal=goal)
    tau = monotonicity(values, goal=goal)
    key = keys.EVAL_MONOTONICITY_PER_EVAL + "x"
    assert out.get(key, math.nan) == tau or (math.isnan(tau) and key not in out)
    assert key not in out or -1.0 <= out[key] <= 1.0


def test_a_non_finite_eval_value_is_left_out_of_the_monotonicity_not_blocking_it():
    tracker = EvalStability(EvalStabilityConfig(min_checkpoints=3))
    out = {}
    for step, value in enumerate([0.1, math.nan, 0.2, 0.3]):
        out = tracker.observe("acc", step, value)
    assert out == {keys.EVAL_MONOTONICITY_PER_EVAL + "acc": 1.0}  # τ of 0.1, 0.2, 0.3


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(2, 7).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, 3), min_size=n, max_size=n),
            st.lists(st.lists(st.integers(0, 3), min_size=n, max_size=n), min_size=1, max_size=5),
        )
    )
)
def test_the_vectorised_taus_equal_kendall_tau_b_column_by_column(data) -> None:
    # small integer values: ties everywhere, and columns or references that tie every pair (NaN)
    reference, columns = data
    table = np.array(columns, dtype=float).T  # items × columns
    expected = [kendall_tau_b(list(table[:, c]), reference) for c in range(table.shape[1])]
    got = _taus_against(table, np.array(reference, dtype=float))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
