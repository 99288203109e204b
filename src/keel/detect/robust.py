"""Robust location and scale of a window of values: the baseline every online detector compares with.

Median and MAD rather than mean and standard deviation, so the outliers a detector is looking for do not
move the baseline they are measured against (OLMo-core's 6σ rule uses mean/std and a spike inflates the
std for the next 128 steps; see reference/anchors.md §2.1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

MAD_TO_STD = 1.4826  # MAD of a normal distribution × 1.4826 = its standard deviation
# Standard error of the median of n values with scale σ is sqrt(π/2)·σ/√n (for normal data; 1.2533 = sqrt(π/2)).
MEDIAN_SE = math.sqrt(math.pi / 2)


def robust_location_scale(values: Sequence[float]) -> tuple[float, float]:
    """(median, MAD × 1.4826) of the values; NaN, NaN for an empty window.

    Example:
        >>> robust_location_scale([1.0, 2.0, 3.0, 4.0, 100.0])
        (3.0, 1.4826)
    """
    if len(values) == 0:
        return float("nan"), float("nan")
    # Plain sorted lists: for the short windows detectors keep (~64 values) this is several times faster
    # than NumPy, whose per-call overhead dominates at this size, and it runs on every step.
    location = median(values)
    return location, median([abs(v - location) for v in values]) * MAD_TO_STD


def median(values: Iterable[float]) -> float:
    """The median of finite values (mean of the middle two for an even count); NaN when empty.

    Example:
        >>> median([3.0, 1.0, 2.0, 10.0])
        2.5
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def robust_z(value: float, location: float, scale: float, floor: float) -> float:
    """(value − location) / max(scale, floor): a z-score whose scale never collapses to zero.

    Example:
        >>> robust_z(10.0, 4.0, 0.0, floor=2.0)
        3.0
    """
    return (value - location) / max(scale, floor)


def step_noise(differences: Sequence[float]) -> float:
    """The scale of a series' step-to-step noise from its first differences: MAD × 1.4826 / √2.

    The difference of two independent values has √2 times their scale, and a trend or a one-off level change
    (an epoch boundary, a curriculum switch) moves few differences, so the median ignores it where a window's
    own spread would count it as noise. NaN for an empty window.

    Example:
        >>> round(step_noise([0.1, -0.1, 0.1, -0.1, 5.0]), 4)
        0.1048
    """
    if len(differences) == 0:
        return float("nan")
    return median(map(abs, differences)) * MAD_TO_STD / math.sqrt(2)


def median_standard_error(scale: float, n: int) -> float:
    """How far the median of ``n`` values with noise ``scale`` strays from the level: sqrt(π/2)·scale/√n.

    Example:
        >>> round(median_standard_error(0.3, 9), 4)
        0.1253
    """
    return MEDIAN_SE * scale / math.sqrt(n)
