"""Robust trend of a signal: the Theil–Sen slope over a window, and a windowed tracker for detectors.

Theil–Sen (the median of all pairwise slopes) ignores up to ~29 % of outlying points, so one noisy batch
does not fake a trend, and on a log scale its slope is a growth rate per step (``ln 2 / rate`` steps to
double). Sen 1968, "Estimates of the regression coefficient based on Kendall's tau", JASA 63(324).
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np


def theil_sen_slope(steps: Sequence[float], values: Sequence[float]) -> float:
    """Median of the pairwise slopes (vⱼ − vᵢ)/(sⱼ − sᵢ) over pairs with sⱼ ≠ sᵢ; NaN for fewer than 2 points.

    Example:
        >>> theil_sen_slope([0, 1, 2, 3, 4], [0.0, 1.0, 2.0, 30.0, 4.0])
        1.0
    """
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return math.nan
    i, j = _pairs(x.size)
    dx = x[j] - x[i]
    keep = dx != 0
    if not keep.any():
        return math.nan
    return float(np.median((y[j] - y[i])[keep] / dx[keep]))


@functools.lru_cache(maxsize=64)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


class TrendWindow:
    """The last ``size`` finite (step, value) points of a signal, optionally on a log scale.

    Example:
        >>> w = TrendWindow(size=4, log=True)
        >>> for s, v in enumerate([1.0, 2.0, 4.0, 8.0]):
        ...     _ = w.add(s, v)
        >>> round(w.slope(), 4)  # ln 2 per step
        0.6931
    """

    def __init__(self, size: int, *, log: bool = False) -> None:
        self.size, self.log = size, log
        self.points: deque[tuple[int, float]] = deque(maxlen=size)
        # median and slope of the points as they are: detectors ask for them several times a step
        self._cache: dict[str, float] = {}

    def add(self, step: int, value: float) -> bool:
        """Append a point; False (and nothing added) for a non-finite value, or a non-positive one on a log scale."""
        if not math.isfinite(value) or (self.log and value <= 0):
            return False
        self.points.append((step, math.log(value) if self.log else value))
        self._cache.clear()
        return True

    @property
    def full(self) -> bool:
        return len(self.points) == self.size

    def slope(self) -> float:
        """Theil–Sen slope per step of the (transformed) values; NaN with fewer than 2 points."""
        if "slope" not in self._cache:
            self._cache["slope"] = theil_sen_slope([s for s, _ in self.points], [v for _, v in self.points])
        return self._cache["slope"]

    def median(self) -> float:
        """Median of the (transformed) values (finite by construction: `add` keeps no other)."""
        if "median" not in self._cache:
            ordered = sorted(v for _, v in self.points)
            mid = len(ordered) // 2
            self._cache["median"] = (
                math.nan
                if not ordered
                else ordered[mid]
                if len(ordered) % 2
                else 0.5 * (ordered[mid - 1] + ordered[mid])
            )
        return self._cache["median"]

    def first_step(self) -> int:
        return self.points[0][0] if self.points else -1

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "log": self.log, "points": [list(p) for p in self.points]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size, self.log = int(state["size"]), bool(state["log"])
        self.points = deque(((int(s), float(v)) for s, v in state["points"]), maxlen=self.size)
        self._cache.clear()


class StartingLevel:
    """A signal's starting level (its first ``points`` finite measurements) and a `TrendWindow` over all of them.

    The plumbing of detectors that judge a signal against where it started — attention entropy against its
    early maximum, log Z against its early median: `add` says whether a measurement is one to judge.

    Example:
        >>> level = StartingLevel(points=2, window=4)
        >>> [level.add(s, v) for s, v in enumerate([3.0, 3.2, float("nan"), 2.0])]
        [False, False, False, True]
        >>> level.early, round(level.trend.slope(), 3)
        ([3.0, 3.2], -0.333)
    """

    def __init__(self, points: int, window: int) -> None:
        self.points = points
        self.early: list[float] = []
        self.trend = TrendWindow(window)

    @property
    def known(self) -> bool:
        return len(self.early) >= self.points

    def add(self, step: int, value: float) -> bool:
        """Take a measurement; True when the starting level is known and this (finite) one comes after it."""
        if not self.trend.add(step, value):
            return False
        if not self.known:
            self.early.append(value)
            return False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"early": list(self.early), "trend": self.trend.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.early = [float(v) for v in state["early"]]
        self.trend.load_state_dict(state["trend"])
