import numpy as np
import pytest

from keel.report.downsample import downsample_minmax


def _reference(steps, values, max_points):
    """Bucket by bucket in plain Python: first index of the min and of the max of the finite values, and
    both ends."""
    n, buckets = len(steps), (max_points - 2) // 2
    edges = [int(x) for x in np.linspace(0, n, buckets + 1)]
    keep = [(0, False), (n - 1, False)]
    for a, b in zip(edges, edges[1:], strict=False):
        idx = [i for i in range(a, b) if np.isfinite(values[i])]
        if not idx:
            keep.append((a, True))
            continue
        lo = min(idx, key=lambda i: (values[i], i))
        hi = min(idx, key=lambda i: (-values[i], i))
        keep += [(lo, False), (hi, False)]
    picks = sorted({i for i, _ in keep})
    gaps = {i for i, g in keep if g}
    return steps[picks], np.array([np.nan if i in gaps else values[i] for i in picks])


@pytest.mark.parametrize("n,max_points", [(10_000, 500), (1001, 100), (37, 10)])
def test_matches_a_per_bucket_reference_and_keeps_every_extreme(n, max_points):
    rng = np.random.default_rng(n)
    steps = np.arange(n) * 3
    values = rng.standard_normal(n)
    values[n // 3] = 50.0  # a one-step spike
    values[n // 2] = -50.0
    values[5:9] = np.nan
    values[-1] = np.inf
    s, v = downsample_minmax(steps, values, max_points)
    rs, rv = _reference(steps, values, max_points)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(v, rv)
    assert len(s) <= max_points and np.all(np.diff(s) > 0)
    assert 50.0 in v and -50.0 in v


def test_short_input_is_returned_as_is_and_all_nan_bucket_is_a_gap():
    steps, values = np.arange(5), np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    s, v = downsample_minmax(steps, values, 10)
    assert s is steps and v is values
    values = np.array([1.0, 2.0, 3.0, np.nan, np.nan, np.nan, 4.0, 5.0, 6.0])
    s, v = downsample_minmax(np.arange(9), values, 8)  # 3 buckets of 3, plus the ends
    assert list(s) == [0, 2, 3, 6, 8]
    np.testing.assert_array_equal(v, [1.0, 3.0, np.nan, 4.0, 6.0])  # the all-NaN bucket is a gap


def test_bad_max_points():
    with pytest.raises(ValueError, match="max_points"):
        downsample_minmax(np.arange(3), np.ones(3), 1)
