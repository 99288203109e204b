"""The divergence detector's units: the array forms give the scalar forms' numbers."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.detect._change import moved_best, relative_change, relative_changes, rise, rises

_LEVELS = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([0.0, 1e-300, 1e300, -1e300, 5e-324, 1.0, 2.0]))


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(_LEVELS, _LEVELS), max_size=60))
def test_property_relative_changes_are_bit_identical_to_relative_change(pairs):
    before = np.array([b for b, _ in pairs], dtype=np.float64)
    after = np.array([a for _, a in pairs], dtype=np.float64)
    assert repr(relative_changes(before, after).tolist()) == repr([relative_change(b, a) for b, a in pairs])


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(_LEVELS, st.one_of(_LEVELS, st.just(math.inf))), max_size=60))
def test_property_rises_are_rise_within_a_few_ulp(pairs):
    medians = np.array([m for m, _ in pairs], dtype=np.float64)
    best = np.array([b for _, b in pairs], dtype=np.float64)
    for got, (m, b) in zip(rises(medians, best).tolist(), pairs, strict=True):
        want = rise(m, b)
        if m > 0 and 0 < b < math.inf and m / b == 0:  # the quotient underflows: -inf for a screen, as low
            assert got == -math.inf and want < -700
        else:
            assert got == want or abs(got - want) <= 1e-12 * (1 + abs(want)), (m, b, got, want)


def test_moved_best_follows_a_wider_windows_higher_median_only():
    assert moved_best(1.0, 2.0, 3.0) == 1.5  # relatively: the best rises by the same factor
    assert moved_best(-1.0, 2.0, 3.0) == 0.0  # a non-positive best moves by the difference
    assert moved_best(1.0, 3.0, 2.0) == 1.0 and moved_best(math.inf, 2.0, 3.0) == math.inf
