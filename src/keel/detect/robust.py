"""Robust location and scale of a window of values: the baseline every online detector compares with.

Median and MAD rather than mean and standard deviation, so the outliers a detector is looking for do not
move the baseline they are measured against (OLMo-core's 6σ rule uses the mean/std of a 128-step window, so
one spike inflates the std it is judged against for the next 128 steps).

Each statistic is defined once here. Detectors that keep their window sorted call the ``*_of_sorted`` forms
(no sort per step); `keel doctor`'s batch scans call the vectorised `rolling_median` and `rolling_step_noise`,
which give bit-identical values to the scalar forms (same order statistics, same float operations).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import TypeVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_FloatOrArray = TypeVar("_FloatOrArray", float, np.ndarray)  # a scale formula applied to one value or element-wise

MAD_TO_STD = 1.4826  # MAD of a normal distribution × 1.4826 = its standard deviation
# Standard error of the median of n values with scale σ is sqrt(π/2)·σ/√n (for normal data; 1.2533 = sqrt(π/2)).
MEDIAN_SE = math.sqrt(math.pi / 2)
_ROWS = 1 << 14  # windows partitioned at a time by the rolling forms (bounds their scratch memory)


def robust_location_scale(values: Sequence[float]) -> tuple[float, float]:
    """(median, MAD × 1.4826) of finite values; NaN, NaN for an empty window.

    Example:
        >>> robust_location_scale([1.0, 2.0, 3.0, 4.0, 100.0])
        (3.0, 1.4826)
    """
    return sorted_location_scale(sorted(values))


def sorted_location_scale(ordered: Sequence[float]) -> tuple[float, float]:
    """`robust_location_scale` of values already in ascending order, without a sort.

    A detector that keeps its window sorted (`keel.detect._running_median.RunningMedian`) gets its baseline
    in O(log n) per step instead of two sorts of the window.

    Example:
        >>> sorted_location_scale([1.0, 2.0, 3.0, 4.0, 100.0])
        (3.0, 1.4826)
    """
    location = median_of_sorted(ordered)
    if len(ordered) == 0:
        return location, location
    return location, median_abs_deviation(ordered, location) * MAD_TO_STD


def median(values: Iterable[float]) -> float:
    """The median of finite values (mean of the middle two for an even count); NaN when empty.

    Example:
        >>> median([3.0, 1.0, 2.0, 10.0])
        2.5
    """
    return median_of_sorted(sorted(values))


def median_of_sorted(ordered: Sequence[float]) -> float:
    """The median of values in ascending order: the middle one, or the mean of the middle two; NaN when empty.

    Example:
        >>> median_of_sorted([1.0, 2.0, 3.0, 10.0])
        2.5
    """
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def median_abs_deviation(ordered: Sequence[float], location: float) -> float:
    """The median of ``abs(v - location)`` over finite values in ascending order, by selection, not a sort.

    The deviations of the values below ``location`` (read downwards) and of the others (read upwards) are two
    ascending runs (float subtraction is monotone), so the middle deviations are found by a binary search over
    how many of them come from each run: O(log n), and the same numbers a sort of the deviations gives (each
    is the same ``abs(v - location)``). NaN when empty.

    Example:
        >>> median_abs_deviation([1.0, 2.0, 3.0, 4.0, 100.0], 3.0)
        1.0
    """
    n = len(ordered)
    if n == 0:
        return float("nan")
    split = bisect.bisect_left(ordered, location)  # run L: ordered[split-1], ordered[split-2] …; run R: ordered[split:]
    k = (n - 1) // 2  # the lower middle deviation (0-based); an even count also needs the next one
    # Take i deviations from L and k + 1 - i from R: the first i whose next L deviation is not below the last R
    # deviation taken makes the k + 1 taken the k + 1 smallest.
    lo, hi = max(0, k + 1 - (n - split)), min(k + 1, split)
    while lo < hi:
        i = (lo + hi) // 2
        if abs(ordered[split - 1 - i] - location) < abs(ordered[split + k - i] - location):
            lo = i + 1
        else:
            hi = i
    i, j = lo, k + 1 - lo
    lower = max(
        abs(ordered[split - i] - location) if i else -math.inf,
        abs(ordered[split + j - 1] - location) if j else -math.inf,
    )
    if n % 2:
        return lower
    upper = min(
        abs(ordered[split - 1 - i] - location) if i < split else math.inf,
        abs(ordered[split + j] - location) if split + j < n else math.inf,
    )
    return 0.5 * (lower + upper)


def robust_z(value: float, location: float, scale: float, floor: float) -> float:
    """(value − location) / max(scale, floor): a z-score whose scale never collapses to zero.

    Example:
        >>> robust_z(10.0, 4.0, 0.0, floor=2.0)
        3.0
    """
    return (value - location) / max(scale, floor)


def relative_excess(log_ratio: float) -> float:
    """exp(x) − 1: how far above 1 a ratio is, from its log; ∞ where that overflows (not an error).

    Example:
        >>> relative_excess(math.log(3.0)), relative_excess(1e4)
        (2.0, inf)
    """
    try:
        return math.expm1(log_ratio)
    except OverflowError:  # a value 10^300 times its median: an extreme excess, which a detector must report
        return math.inf


def step_noise(differences: Sequence[float]) -> float:
    """The scale of a series' step-to-step noise from its first differences: MAD × 1.4826 / √2.

    The difference of two independent values has √2 times their scale, and a trend or a one-off level change
    (an epoch boundary, a curriculum switch) moves few differences, so the median ignores it where a window's
    own spread would count it as noise. NaN for an empty window.

    Example:
        >>> round(step_noise([0.1, -0.1, 0.1, -0.1, 5.0]), 4)
        0.1048
    """
    return step_noise_of(median(map(abs, differences)))


def step_noise_of(median_abs_difference: _FloatOrArray) -> _FloatOrArray:
    """`step_noise` from the median of the absolute differences (a caller that keeps them sorted has it).

    Works element-wise on a NumPy array as well (`rolling_step_noise`).
    """
    return median_abs_difference * MAD_TO_STD / math.sqrt(2)


def median_standard_error(scale: _FloatOrArray, n: int) -> _FloatOrArray:
    """How far the median of ``n`` values with noise ``scale`` strays from the level: sqrt(π/2)·scale/√n.

    Example:
        >>> round(median_standard_error(0.3, 9), 4)
        0.1253
    """
    return MEDIAN_SE * scale / math.sqrt(n)


@np.errstate(over="ignore", invalid="ignore")  # as float arithmetic: inf + -inf is NaN, without a warning
def rolling_median(values: np.ndarray, size: int, *, every: int = 1) -> np.ndarray:
    """``median(values[i : i + size])`` for i = 0, every, 2·every, …: the vectorised form of `median`.

    Bit-identical to `median` on each window (the same order statistics, the same mean of the middle two),
    for finite or infinite values; memory stays bounded however long ``values`` is.

    Example:
        >>> rolling_median(np.array([5.0, 1.0, 4.0, 2.0, 3.0]), 3).tolist()
        [4.0, 2.0, 3.0]
    """
    values = np.asarray(values, dtype=np.float64)
    count = max(0, (len(values) - size) // every + 1) if size >= 1 else 0
    out = np.empty(count)
    if not count:
        return out
    windows = sliding_window_view(values, size)[::every]  # (count, size), a view: no copy yet
    for start in range(0, count, _ROWS):
        out[start : start + _ROWS] = row_medians(windows[start : start + _ROWS])
    return out


@np.errstate(over="ignore", invalid="ignore")
def row_medians(rows: np.ndarray) -> np.ndarray:
    """`median` of each row of a 2-d array (at least one column), vectorised and bit-identical.

    Example:
        >>> row_medians(np.array([[3.0, 1.0, 2.0, 10.0], [1.0, 1.0, 5.0, 7.0]])).tolist()
        [2.5, 3.0]
    """
    mid = rows.shape[1] // 2
    # one selection (two cost several times more): the lower middle of an even count is then the largest of
    # the values before the upper one
    part = np.partition(rows, mid, axis=1)
    return part[:, mid] if rows.shape[1] % 2 else 0.5 * (part[:, :mid].max(axis=1) + part[:, mid])


def rolling_step_noise(differences: np.ndarray, span: int, *, every: int = 1) -> np.ndarray:
    """`step_noise` of each window of ``span`` consecutive differences (starting every ``every``), vectorised.

    Example:
        >>> d = np.array([0.1, -0.1, 0.1, -0.1, 5.0])
        >>> rolling_step_noise(d, 5).tolist() == [step_noise(d.tolist())]
        True
    """
    return step_noise_of(rolling_median(np.abs(differences), span, every=every))
