"""A signal's drift from its starting level, judged against its own step-to-step noise.

The preference and policy-gradient detectors ask the same two questions of a noisy series: has it moved away from
where the run started (the median of the first measurements against the median of the recent ones), and is it still
moving (the Theil–Sen slope over the recent window)? Both are compared with the series' own noise — the robust spread
of its first differences around their median, which a steady trend (it shifts every difference alike) does not
inflate — so the rules need no knowledge of the signal's units, and an absolute floor keeps a series that is exactly
constant (a clip share of 0, a fresh reference's displacement of 0) from turning a rounding error into a trend.
"""

from __future__ import annotations

import math
from typing import Any

from keel.detect.robust import median, median_standard_error, robust_location_scale
from keel.detect.trend import StartingLevel

# The standard error of a least-squares slope's change over n equally spaced points is σ·sqrt(12/n) (for large n);
# Theil–Sen's is within a few per cent of it on normal noise (Sen 1968).
SLOPE_CHANGE_SE = 12.0


class Drift:
    """The starting level (median of the first ``points`` finite values) and the last ``window`` values of a signal.

    Example:
        >>> d = Drift(points=3, window=5)
        >>> taken = [d.add(s, v) for s, v in enumerate([1.0, 1.1, 0.9, 1.0, 1.6, 2.0, 2.4, 3.1])]
        >>> d.start, d.level, round(d.change_z(floor=0.01), 1) > 3, d.trend_z(floor=0.01) > 3
        (1.0, 2.0, True, True)
    """

    def __init__(self, points: int, window: int) -> None:
        self._level = StartingLevel(points, window)

    @property
    def known(self) -> bool:
        """The starting level is known and the window holds at least 3 values."""
        return self._level.known and len(self._level.trend.points) >= 3

    def add(self, step: int, value: float) -> bool:
        """Take a measurement; True when it is finite and comes after the starting level (as `StartingLevel`)."""
        return self._level.add(step, value)

    @property
    def start(self) -> float:
        return median(self._level.early) if self._level.known else math.nan

    @property
    def level(self) -> float:
        """The median of the recent window."""
        return self._level.trend.median()

    def first_step(self) -> int:
        """The step of the oldest value in the recent window; -1 when it is empty."""
        return self._level.trend.first_step()

    def values(self) -> list[float]:
        return [v for _, v in self._level.trend.points]

    def noise(self, floor: float) -> float:
        """Step-to-step noise of the recent window, at least ``floor``."""
        xs = self.values()
        # MAD of the differences around their median (a trend is their median), ÷ √2: a difference has √2·σ
        sigma = robust_location_scale([b - a for a, b in zip(xs, xs[1:], strict=False)])[1] / math.sqrt(2)
        sigma = sigma if len(xs) >= 3 else math.nan
        return max(sigma, floor) if math.isfinite(sigma) else floor

    def change_error(self, floor: float) -> float:
        """The standard error of (recent median − starting level)."""
        sigma = self.noise(floor)
        n_recent, n_early = len(self._level.trend.points), len(self._level.early)
        return math.hypot(median_standard_error(sigma, n_recent), median_standard_error(sigma, n_early))

    def change_z(self, floor: float) -> float:
        """(recent median − starting level) in units of its standard error (positive: it rose)."""
        return (self.level - self.start) / self.change_error(floor)

    def slope(self) -> float:
        """Theil–Sen slope per step over the recent window."""
        return self._level.trend.slope()

    def trend_z(self, floor: float) -> float:
        """The window's change along its slope in units of that change's standard error (positive: rising)."""
        points = self._level.trend.points
        slope = self.slope()
        if len(points) < 3 or not math.isfinite(slope):
            return 0.0
        span = points[-1][0] - points[0][0]
        return slope * span / (self.noise(floor) * math.sqrt(SLOPE_CHANGE_SE / len(points)))

    def state_dict(self) -> dict[str, Any]:
        return self._level.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._level.load_state_dict(state)


def project(evidence: dict[str, Any], step: int, ahead: float) -> None:
    """Add ``steps_to_critical`` and ``projected_critical_step`` to a finding's evidence when ``ahead`` is finite.

    Example:
        >>> evidence = {}
        >>> project(evidence, 100, 12.3), project(evidence, 100, math.inf)
        (None, None)
        >>> evidence
        {'steps_to_critical': 12.3, 'projected_critical_step': 113}
    """
    if math.isfinite(ahead) and ahead >= 0:
        evidence["steps_to_critical"] = round(ahead, 1)
        evidence["projected_critical_step"] = step + math.ceil(ahead)
