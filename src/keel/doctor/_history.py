"""The segment history `keel.doctor.examine` replays from after a restart or a rollback: the observations kept, as
runs of consecutive observation numbers (a log without restarts is one run, not 16 bytes per observation)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np


class History:
    """The current segment's observations, in order (positions 0 … len - 1), as runs of consecutive observation
    numbers: a log without restarts is one run, not 16 bytes per observation (its number and step). Their steps
    increase strictly.

    Example:
        >>> h = History(np.array([10, 20, 30, 40, 15, 25], dtype=np.int64))
        >>> h.extend(0, 2); h.extend(2, 3); h.truncate(1); h.extend(4, 6)  # 10, then the restart at 15, 25
        >>> len(h), h.last_step(), h.bisect_left(20), list(h.runs_from(0))
        (3, 25, 2, [(0, 1), (4, 6)])
    """

    def __init__(self, steps: np.ndarray) -> None:
        self.steps = steps
        self._firsts: list[int] = []  # each run's first observation
        self._stops: list[int] = []  # and the observation after its last
        self._ends: list[int] = []  # the position after each run (cumulative lengths)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def extend(self, first: int, stop: int) -> None:
        """Observations [first, stop) kept after the others."""
        if first >= stop:
            return
        if self._stops and self._stops[-1] == first:
            self._stops[-1] = stop
            self._ends[-1] += stop - first
        else:
            self._firsts.append(first)
            self._stops.append(stop)
            self._ends.append(len(self) + stop - first)

    def _start(self, run: int) -> int:
        """The position of run ``run``'s first observation."""
        return self._ends[run] - (self._stops[run] - self._firsts[run])

    def step_at(self, position: int) -> int:
        """The step of the observation at ``position``."""
        run = bisect.bisect_right(self._ends, position)
        return int(self.steps[self._firsts[run] + position - self._start(run)])

    def last_step(self) -> int | None:
        """The step of the newest observation (None when there is none)."""
        return int(self.steps[self._stops[-1] - 1]) if self._stops else None

    def bisect_left(self, step: int) -> int:
        """How many observations have a step below ``step``."""
        run = bisect.bisect_left(range(len(self._stops)), step, key=lambda r: int(self.steps[self._stops[r] - 1]))
        if run == len(self._stops):
            return len(self)
        first, stop = self._firsts[run], self._stops[run]
        return self._start(run) + int(np.searchsorted(self.steps[first:stop], step, side="left"))

    def truncate(self, keep: int) -> None:
        """Keep the first ``keep`` observations only."""
        run = bisect.bisect_left(self._ends, keep)  # the run holding position keep - 1 (or none is cut)
        if run == len(self._ends):
            return
        start = self._start(run)
        del self._firsts[run + 1 :], self._stops[run + 1 :], self._ends[run + 1 :]
        if keep == start:
            del self._firsts[run], self._stops[run], self._ends[run]
        else:
            self._stops[run] = self._firsts[run] + keep - start
            self._ends[run] = keep

    def runs_from(self, position: int) -> Iterator[tuple[int, int]]:
        """[first, stop) of each run of the observations from ``position`` on."""
        start = 0
        for first, stop, end in zip(self._firsts, self._stops, self._ends, strict=True):
            if end > position:
                yield first + max(0, position - start), stop
            start = end
