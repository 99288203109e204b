"""Robust location and scale of a window of values: the baseline every online detector compares with.

Median and MAD rather than mean and standard deviation, so the outliers a detector is looking for do not
move the baseline they are measured against (OLMo-core's 6σ rule uses mean/std and a spike inflates the
std for the next 128 steps; see reference/anchors.md §2.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAD_TO_STD = 1.4826  # MAD of a normal distribution × 1.4826 = its standard deviation


def robust_location_scale(values: Sequence[float]) -> tuple[float, float]:
    """(median, MAD × 1.4826) of the values; NaN, NaN for an empty window.

    Example:
        >>> robust_location_scale([1.0, 2.0, 3.0, 4.0, 100.0])
        (3.0, 1.4826)
    """
    if len(values) == 0:
        return float("nan"), float("nan")
    arr = np.asarray(values, dtype=np.float64)
    median = float(np.median(arr))
    return median, float(np.median(np.abs(arr - median))) * MAD_TO_STD


def robust_z(value: float, location: float, scale: float, floor: float) -> float:
    """(value − location) / max(scale, floor): a z-score whose scale never collapses to zero.

    Example:
        >>> robust_z(10.0, 4.0, 0.0, floor=2.0)
        3.0
    """
    return (value - location) / max(scale, floor)
