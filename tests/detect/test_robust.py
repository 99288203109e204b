import math

import numpy as np
import pytest

from keel.detect.robust import MAD_TO_STD, median, robust_location_scale, robust_z


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
