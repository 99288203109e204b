"""The median of the last n values of a series, updated in O(n) memory moves per value instead of a sort.

A detector whose window grows with the run's noise (hundreds of values) would otherwise sort that window on
every step; `keel doctor` runs the detectors over logs of a million steps.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable


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

    def resize(self, size: int) -> None:
        if not 1 <= size <= self.capacity:
            raise ValueError(f"size={size}; allowed: 1 <= size <= capacity={self.capacity}")
        if size != self.size:
            self.size = size
            self._sorted = sorted(list(self.values)[-size:])

    def median(self) -> float:
        """The median of the window (mean of the middle two for an even count); NaN when empty."""
        n = len(self._sorted)
        if n == 0:
            return float("nan")
        mid = n // 2
        return self._sorted[mid] if n % 2 else 0.5 * (self._sorted[mid - 1] + self._sorted[mid])
