"""The median (and MAD) of the last n values of a series, kept sorted: O(log n) search per value, no sort.

A detector whose window grows with the run's noise (hundreds of values) would otherwise sort that window on
every step, and the spike detector would sort its window twice per step (median, then MAD); the Guard runs
them on every training step and `keel doctor` over logs of a million steps.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable

from keel.detect.robust import median_of_sorted, sorted_location_scale


class RunningMedian:
    """The median of the last ``size`` values pushed; ``resize`` changes ``size`` and keeps what it can.

    The values themselves are kept (up to ``capacity``) so a window can grow back over values it had
    dropped, and so the state is just the values: rebuilding from them gives the same medians.

    Example:
        >>> rm = RunningMedian(size=3, capacity=5)
        >>> for x in [5.0, 1.0, 4.0, 2.0]:
        ...     rm.push(x)
        >>> rm.median(), rm.resize(5), rm.median()
        (2.0, None, 3.0)
    """

    def __init__(self, *, size: int, capacity: int, values: Iterable[float] = ()) -> None:
        if not 1 <= size <= capacity:
            raise ValueError(f"size={size}, capacity={capacity}; allowed: 1 <= size <= capacity")
        self.size, self.capacity = size, capacity
        self.values: deque[float] = deque(values, maxlen=capacity)
        self._sorted = sorted(list(self.values)[-size:])

    def __len__(self) -> int:
        """How many values the current median is over (at most ``size``)."""
        return len(self._sorted)

    def push(self, x: float) -> None:
        if len(self.values) >= self.size:  # the value that leaves the last-``size`` window
            leaving = self.values[-self.size]
            del self._sorted[bisect.bisect_left(self._sorted, leaving)]
        self.values.append(x)
        bisect.insort(self._sorted, x)

    def extend(self, xs: Iterable[float]) -> None:
        """`push` each of ``xs`` (more than a few are one sort of the window instead of a search per value)."""
        xs = list(xs)
        if len(xs) * 8 < self.size:
            for x in xs:
                self.push(x)
            return
        self.values.extend(xs)
        self._sorted = sorted(list(self.values)[-self.size :])

    def resize(self, size: int) -> None:
        if not 1 <= size <= self.capacity:
            raise ValueError(f"size={size}; allowed: 1 <= size <= capacity={self.capacity}")
        if size != self.size:
            self.size = size
            self._sorted = sorted(list(self.values)[-size:])

    def ranked(self, rank: int) -> float:
        """The ``rank``-th smallest value of the window (0: the least)."""
        return self._sorted[rank]

    def median(self) -> float:
        """The median of the window (mean of the middle two for an even count); NaN when empty."""
        return median_of_sorted(self._sorted)

    def location_scale(self) -> tuple[float, float]:
        """(median, MAD × 1.4826) of the window (`keel.detect.robust.robust_location_scale`); NaN, NaN when empty."""
        return sorted_location_scale(self._sorted)
