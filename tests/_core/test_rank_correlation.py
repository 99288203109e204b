"""Kendall's τ-b: against scipy on generated data with ties, worked examples by hand, and hostile inputs."""

from __future__ import annotations

import math

import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core.rank_correlation import kendall_tau_b

# few distinct values so that ties are common
_tied = st.integers(-3, 3).map(float)
_any = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.data())
def test_tau_b_matches_scipy_kendalltau_with_ties(data):
    n = data.draw(st.integers(2, 25))
    values = data.draw(st.sampled_from([_tied, _any]))
    x = data.draw(st.lists(values, min_size=n, max_size=n))
    y = data.draw(st.lists(values, min_size=n, max_size=n))
    expected = scipy.stats.kendalltau(x, y).statistic  # variant "b" by default
    got = kendall_tau_b(x, y)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),  # 6 concordant of 6
        ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),  # 6 discordant
        ([1, 2, 3], [1, 3, 2], 1 / 3),  # C=2, D=1, no ties: (2 − 1) / 3
        ([1, 2, 3, 4], [1, 2, 2, 3], 5 / math.sqrt(6 * 5)),  # one tie in y: 5 concordant, 6 x-ordered, 5 y-ordered
        ([1, 1, 2, 2], [1, 2, 1, 2], 0.0),  # 4 pairs ordered in x; 2 of them ordered in y (1 conc., 1 disc.)
        ([1, 1, 2, 3], [1, 2, 2, 3], 4 / math.sqrt(5 * 5)),  # C=4 (13,14,24,34), tie pairs 12 (x) and 23 (y)
    ],
)
def test_tau_b_worked_examples_by_hand(x, y, expected):
    assert kendall_tau_b(x, y) == pytest.approx(expected, abs=1e-15)


def test_tau_b_is_undefined_where_scipy_says_so():
    assert math.isnan(kendall_tau_b([], []))
    assert math.isnan(kendall_tau_b([1.0], [2.0]))
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))  # x orders no pair
    assert math.isnan(kendall_tau_b([1, 2, math.nan], [1, 2, 3]))


def test_tau_b_handles_infinities_as_extreme_ranks():
    assert kendall_tau_b([1, 2, math.inf], [-math.inf, 0, 5]) == 1.0


def test_tau_b_refuses_sequences_of_different_lengths_naming_both():
    with pytest.raises(ValueError, match="x has 3 values and y 2"):
        kendall_tau_b([1, 2, 3], [1, 2])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.lists(_any, min_size=2, max_size=20, unique=True))
def test_tau_b_of_a_sequence_with_itself_is_one_and_with_its_reverse_minus_one(x):
    assert kendall_tau_b(x, x) == 1.0
    assert kendall_tau_b(x, [-v for v in x]) == -1.0
