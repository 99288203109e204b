"""Edge-of-stability detector: the learning rate times the sharpness beyond the optimizer's stability limit.

Reads ``curvature/margin`` (the `sharpness` probe: η·λ_max/2 for gradient descent, the preconditioned
analogue for Adam; the probe re-measures whenever the LR has doubled). A margin near 1 is the benign edge
of stability where full-batch training self-stabilises (Cohen et al. 2021; Lu et al., "benign
oscillation"); the alarm is a margin well above it — ``warn_margin`` (default 2: the top direction grows
by |1 − ηλ| ≥ 3× per step in the quadratic model) — that is also a sudden rise, ``jump``× the smallest of
the last ``history`` positive measured margins. The second condition keeps the first steps of Adam silent: with
v̂ averaged over a handful of gradients the preconditioned sharpness is huge, and falls as v̂ fills in, which
is no instability; and it keeps a margin that creeps up to the edge (progressive sharpening, which
self-stabilises there) from alarming. A margin between 1 and ``warn_margin`` warns too when it is ``leap``× (default
5) that smallest one: a jump from deep inside the stable region to beyond the edge in one measurement is an LR spike
caught at its first step (the zoo's ``lr_spike``, seed 1: 0.19 → 1.85 while the LR went ×30), which neither the edge's
hovering nor progressive sharpening does. The probe's λ_max is the largest algebraic eigenvalue (Lanczos), so a
negative margin means no positive curvature at all on the probe batch (a locally concave loss; Adam's preconditioning
keeps the signs of the spectrum); stores from before keel used Lanczos also hold negative margins where power
iteration landed on a negative eigenvalue of larger magnitude. Either says nothing of the positive edge and is never
the typical one: as the smallest, any positive margin was "sudden" against it. Only measured margins are judged: the
probe measures on its schedule and again in the very step the LR has doubled since its last measurement, so an LR
jump is judged before its first update is applied. (Carrying a margin forward in proportion to the LR would
false-alarm during warm-up, where sharpness adapts to the growing LR.)

References:
    Cohen et al. 2021, arXiv 2103.00065; Cohen et al. 2022, arXiv 2207.14484; Wu & Su 2023, ICML.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS

KIND = "edge_of_stability"
MARGIN = keys.CURVATURE_MARGIN


@dataclass(kw_only=True)
class EdgeOfStabilityConfig:
    """Settings of the edge-of-stability detector.

    Attributes:
        warn_margin: Margin at or above which the LR is beyond the edge (a warning).
        critical_margin: Margin that is critical.
        jump: The margin must also be this many times the smallest positive recent measured margin.
        leap: A margin >= 1 but below ``warn_margin`` warns when it is this many times that smallest margin.
        history: Measured margins remembered for that.
    """

    warn_margin: float = 2.0
    critical_margin: float = 8.0
    jump: float = 3.0
    leap: float = 5.0
    history: int = 5

    def __post_init__(self) -> None:
        check_types(self)
        if not (self.jump >= 1 and math.isfinite(self.jump)):
            raise ValueError(f"EdgeOfStabilityConfig.jump={self.jump!r}; allowed: a finite number >= 1")
        if not (self.leap >= self.jump and math.isfinite(self.leap)):
            raise ValueError(
                f"EdgeOfStabilityConfig.leap={self.leap!r}; allowed: a finite number >= jump ({self.jump})"
            )
        require_ints(self, "history")
        if not (1 <= self.warn_margin <= self.critical_margin and math.isfinite(self.critical_margin)):
            raise ValueError(
                f"EdgeOfStabilityConfig.warn_margin={self.warn_margin!r}, critical_margin="
                f"{self.critical_margin!r}; allowed: 1 <= warn_margin <= critical_margin < inf"
            )


@DETECTORS.register("edge_of_stability")
class EdgeOfStabilityDetector:
    """Flags η·λ_max beyond the stability threshold.

    Example:
        >>> from keel._core import Observation
        >>> det = EdgeOfStabilityDetector()
        >>> obs = [Observation(step=0, values={"curvature/margin": 30.0, "lr": 1e-4}),  # Adam's first steps
        ...        Observation(step=5, values={"curvature/margin": 1.1, "lr": 0.01}),
        ...        Observation(step=6, values={"curvature/margin": 11.0, "lr": 0.1})]
        >>> [(f.step, f.severity) for o in obs for f in det.update(o)]
        [(6, 'critical')]
    """

    name = "edge_of_stability"

    reads = (MARGIN,)  # `keel.detect.scan.ReadsKeys`: the learning rates are read once a margin is logged
    rests_when_finite = False

    def __init__(self, config: EdgeOfStabilityConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, EdgeOfStabilityConfig, config, fields)
        self._measured_step = -1
        self._recent: deque[float] = deque(maxlen=self.config.history)
        self._episode = Episode(keys=("reported",))  # each measured margin is judged on its own: no run, no onset

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        margin = obs.values.get(MARGIN)
        if margin is None or not math.isfinite(margin):
            return []
        self._measured_step = obs.step
        # the probe's margin is that of the fastest parameter group; "lr/<i>" holds the groups that differ from 0
        lrs = [v for k, v in obs.values.items() if k == keys.LR or k.startswith(f"{keys.LR}/")]
        lr = max(lrs) if lrs else math.nan
        typical = min((m for m in self._recent if m > 0), default=math.nan)
        self._recent.append(margin)
        rise = margin / typical if math.isfinite(typical) else math.nan
        beyond = margin >= cfg.warn_margin and (rise >= cfg.jump or self._episode.reported is not None)
        leapt = margin >= 1 and rise >= cfg.leap  # from deep inside the stable region to past the edge at once
        if not (beyond or leapt):
            if margin < 1:  # back inside the stability limit
                self._episode.close()
            return []
        severity = self._episode.escalate(critical=margin >= cfg.critical_margin, warning=True)
        if severity is None:
            return []
        evidence: dict[str, Any] = {
            "margin": round(margin, 4),
            "lr": lr,
            "stable_lr": lr / margin,
            "typical_margin": round(typical, 4) if math.isfinite(typical) else None,
        }
        for key in (keys.CURVATURE_SHARPNESS, keys.CURVATURE_PRECONDITIONED_SHARPNESS, keys.CURVATURE_TRACE):
            if key in obs.values:
                evidence[key.split("/")[-1]] = round(obs.values[key], 6)
        text = f"the learning rate {lr:.3g} is {margin:.3g}× the local stability limit (≈{lr / margin:.3g})."
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=MARGIN,
                value=margin,
                baseline=1.0,
                evidence=evidence,
                text=text,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "measured_step": self._measured_step,
            "recent": list(self._recent),
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = EdgeOfStabilityConfig(**state["config"])
        self._measured_step = int(state["measured_step"])
        self._episode.load_state_dict(state)
        self._recent = deque((float(v) for v in state["recent"]), maxlen=self.config.history)
