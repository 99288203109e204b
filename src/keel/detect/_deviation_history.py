"""The long and short histories of one member's deviation from its peers (a rank's, a data source's).

MUD-HoG (Gupta et al., seed-catalog #31) keeps, per client, a long-horizon average of its gradient statistics and a
short-horizon one, and names the client whose short history leaves its long one. `keel.guard.RankOutlierDetector`
(per rank) and `keel.detect.SourceDriftDetector` (per data source in one process) keep these fields; each decides
how it updates them and judges them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from keel.detect.robust import median


@dataclass
class DeviationHistory:
    """A member's deviations: the recent ones, an exponentially weighted long mean, and step-to-step changes.

    Attributes:
        n: Deviations taken.
        recent: The last few deviations (the short history; its median is `short`).
        long_sum: Exponentially weighted sum of the deviations the long history took.
        long_weight: The matching sum of weights: ``long_sum / long_weight`` is a bias-free mean from the first value.
        diffs: The last absolute step-to-step changes (the deviation's noise).
        prev: The last deviation taken (NaN before the first).
    """

    n: int = 0
    recent: list[float] = field(default_factory=list)
    long_sum: float = 0.0
    long_weight: float = 0.0
    diffs: list[float] = field(default_factory=list)
    prev: float = math.nan

    @property
    def short(self) -> float:
        """The median of the recent deviations (NaN before any)."""
        return median(self.recent)

    @property
    def long(self) -> float:
        """The long history's mean (NaN before it took any value)."""
        return self.long_sum / self.long_weight if self.long_weight > 0 else math.nan
