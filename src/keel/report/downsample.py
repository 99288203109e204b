"""Min/max downsampling for display: at most two points per bucket, its lowest and highest, in step order.

A spike one step wide survives any zoom level, which a stride or an average would hide (the same idea as
TensorBoard's and plotly-resampler's min-max aggregation). The first and last points are always kept, so the
line spans the whole run. Non-finite values are left out of the extremes; a bucket with no finite value
becomes one NaN point so the line shows a gap there.
"""

from __future__ import annotations

import numpy as np


def downsample_minmax(steps: np.ndarray, values: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` (step, value) pairs keeping each bucket's min and max.

    Args:
        steps: Increasing steps.
        values: Values at those steps (NaN/±inf allowed).
        max_points: Upper bound on the output length (≥ 2).

    Returns:
        (steps, values), a subset of the input in step order; the input itself when it is short enough.

    Example:
        >>> s = np.arange(10); v = np.array([1., 5, 1, 1, 1, 1, 0, 1, 1, 1])
        >>> downsample_minmax(s, v, 6)
        (array([0, 1, 5, 6, 9]), array([1., 5., 1., 0., 1.]))
    """
    if max_points < 2:
        raise ValueError(f"max_points={max_points!r}; allowed: an int >= 2")
    n = len(steps)
    if n <= max_points:
        return steps, values
    buckets = max(1, (max_points - 2) // 2)  # two points per bucket, plus the two ends
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    finite = np.isfinite(values)
    low = np.where(finite, values, np.inf)
    high = np.where(finite, values, -np.inf)
    starts = edges[:-1]
    # Index of each bucket's min and max: reduceat over the bucket starts, then the first index attaining it.
    mins = np.minimum.reduceat(low, starts)
    maxs = np.maximum.reduceat(high, starts)
    bucket_of = np.repeat(np.arange(buckets), np.diff(edges))
    is_min = (low == mins[bucket_of]) & finite
    is_max = (high == maxs[bucket_of]) & finite
    first_min = _first_per_bucket(is_min, bucket_of, buckets)
    first_max = _first_per_bucket(is_max, bucket_of, buckets)
    empty = first_min < 0
    picks = np.concatenate([first_min[~empty], first_max[~empty], starts[empty], [0, n - 1]])
    picks = np.unique(picks)  # sorted, and a bucket whose min and max are one point keeps it once
    out_values = values[picks].astype(np.float64)
    out_values[np.isin(picks, starts[empty])] = np.nan
    return steps[picks], out_values


def _first_per_bucket(mask: np.ndarray, bucket_of: np.ndarray, buckets: int) -> np.ndarray:
    first = np.full(buckets, -1, dtype=np.int64)
    idx = np.flatnonzero(mask)  # ascending, so each bucket's first occurrence is its smallest index
    owners, at = np.unique(bucket_of[idx], return_index=True)
    first[owners] = idx[at]
    return first
