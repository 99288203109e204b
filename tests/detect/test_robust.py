import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.detect._running_median import RunningMedian
from keel.detect.robust import MAD_TO_STD, median, median_standard_error, robust_location_scale, robust_z, step_noise


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
        window = pushed[-rm.size:]
        assert len(rm) == len(window)
        assert rm.median() == (median(window) if window else pytest.approx(math.nan, nan_ok=True))
    rebuilt = RunningMedian(size=rm.size, capacity=12, values=rm.values)
    assert rebuilt.median() == rm.median() or (math.isnan(rm.median()) and math.isnan(rebuilt.median()))


def test_running_median_refuses_a_size_outside_its_capacity():
    with pytest.raises(ValueError, match="size=0"):
        RunningMedian(size=0, capacity=4)
    with pytest.raises(ValueError, match="size=5"):
        RunningMedian(size=2, capacity=4).resize(5)
