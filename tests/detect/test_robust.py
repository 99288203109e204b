import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.detect._running_median import RunningMedian
from keel.detect.robust import (
    MAD_TO_STD,
    median,
    median_standard_error,
    relative_excess,
    robust_location_scale,
    robust_z,
    rolling_median,
    rolling_step_noise,
    sorted_location_scale,
    step_noise,
)


@pytest.mark.parametrize("n", [1, 2, 5, 64, 65])
def test_median_and_mad_match_numpy(n):
    values = np.random.default_rng(n).normal(size=n).tolist()
    loc, scale = robust_location_scale(values)
    assert loc == pytest.approx(float(np.median(values)))
    assert scale == pytest.approx(float(np.median(np.abs(np.array(values) - np.median(values)))) * MAD_TO_STD)


def test_worked_example_ignores_the_outlier():
    assert robust_location_scale([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 1.4826)


def test_empty_window():
    loc, scale = robust_location_scale([])
    assert math.isnan(loc) and math.isnan(scale)
    assert math.isnan(median([]))


def test_z_floor_prevents_division_by_zero():
    assert robust_z(5.0, 5.0, 0.0, floor=0.1) == 0.0
    assert robust_z(6.0, 5.0, 0.0, floor=0.5) == 2.0


def test_step_noise_matches_a_numpy_reference_and_ignores_a_level_change():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.3, 500), rng.normal(-2.0, 0.3, 500)])  # a drop, as at an epoch boundary
    d = np.diff(x)
    assert step_noise(d.tolist()) == pytest.approx(np.median(np.abs(d)) * MAD_TO_STD / math.sqrt(2))
    assert step_noise(d.tolist()) == pytest.approx(0.3, rel=0.1)  # the drop is one difference of 999
    assert math.isnan(step_noise([]))


@pytest.mark.parametrize("n", [9, 101])
def test_median_standard_error_matches_simulated_medians(n):
    rng = np.random.default_rng(n)
    medians = np.median(rng.normal(0, 0.3, (4000, n)), axis=1)
    assert median_standard_error(0.3, n) == pytest.approx(float(medians.std()), rel=0.08)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.one_of(st.floats(-1e6, 1e6), st.integers(1, 12).map(lambda k: -k)), max_size=80))
def test_running_median_equals_the_median_of_the_last_size_values(ops):
    # a float pushes it; a negative integer -k resizes the window to k
    rm, pushed = RunningMedian(size=3, capacity=12), []
    for op in ops:
        if isinstance(op, int):
            rm.resize(-op)
        else:
            rm.push(op)
            pushed.append(op)
        window = pushed[-rm.size :]
        assert len(rm) == len(window)
        assert rm.median() == (median(window) if window else pytest.approx(math.nan, nan_ok=True))
    rebuilt = RunningMedian(size=rm.size, capacity=12, values=rm.values)
    assert rebuilt.median() == rm.median() or (math.isnan(rm.median()) and math.isnan(rebuilt.median()))


def test_running_median_refuses_a_size_outside_its_capacity():
    with pytest.raises(ValueError, match="size=0"):
        RunningMedian(size=0, capacity=4)
    with pytest.raises(ValueError, match="size=5"):
        RunningMedian(size=2, capacity=4).resize(5)


# --- the sorted forms and the vectorised forms give the same numbers as a sort of each window ----------------
def _sorted_reference(values):
    """(median, MAD × 1.4826) by sorting the values and then their deviations (the pre-selection algorithm)."""
    location = _reference_median(values)
    return location, _reference_median([abs(v - location) for v in values]) * MAD_TO_STD


def _reference_median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# finite values, as detectors keep; ±1e308 make deviations (and a mean of the middle two) overflow to ±inf
_VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, -0.0, 1.0, 1.0, 2.0, 1e308, -1e308])
)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_VALUES, min_size=1, max_size=70))
def test_property_selected_mad_is_bit_identical_to_sorting_the_deviations(values):
    # ties, ±0 and overflowing differences included; repr tells 0.0 from -0.0 and NaN from NaN
    assert repr(sorted_location_scale(sorted(values))) == repr(_sorted_reference(values))
    assert repr(robust_location_scale(values)) == repr(_sorted_reference(values))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6) | st.sampled_from([1.0, 2.0, math.inf, -math.inf]), max_size=120),
    size=st.integers(1, 40),
    every=st.integers(1, 17),
)
def test_property_rolling_median_and_noise_equal_the_scalar_forms(values, size, every):
    arr = np.array(values, dtype=np.float64)
    starts = range(0, len(values) - size + 1, every)

    # repr compares NaN as equal; + 0.0 makes -0.0 and 0.0 one value (the median of [-0.0, 0.0] may be either)
    def same(xs):
        return repr([x + 0.0 for x in xs])

    assert same(rolling_median(arr, size, every=every).tolist()) == same([median(values[i : i + size]) for i in starts])
    noise = rolling_step_noise(arr, size, every=every).tolist()
    assert same(noise) == same([step_noise(values[i : i + size]) for i in starts])


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.one_of(st.floats(-1e6, 1e6), st.lists(st.floats(-10, 10), max_size=30)), max_size=60))
def test_running_median_scale_and_extend_match_the_window(ops):
    # a float is pushed, a list extended; the window's (median, MAD) is the reference's at every point
    rm, pushed = RunningMedian(size=7, capacity=7), []
    for op in ops:
        if isinstance(op, list):
            rm.extend(op)
            pushed += op
        else:
            rm.push(op)
            pushed.append(op)
        window = pushed[-7:]
        assert list(rm.values) == window
        if window:
            assert rm.location_scale() == _sorted_reference(window)


def test_relative_excess_is_infinite_where_exp_overflows():
    assert relative_excess(0.0) == 0.0 and relative_excess(1e4) == math.inf
    assert relative_excess(-math.inf) == -1.0
