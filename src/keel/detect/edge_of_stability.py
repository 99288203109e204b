"""Edge-of-stability detector: the learning rate times the sharpness beyond the optimizer's stability limit.

Reads ``curvature/margin`` (the `sharpness` probe: η·λ_max/2 for gradient descent, the preconditioned
analogue for Adam; the probe re-measures whenever the LR has doubled). A margin near 1 is the benign edge
of stability where full-batch training self-stabilises (Cohen et al. 2021; Lu et al., "benign
oscillation"); the alarm is a margin well above it — ``warn_margin`` (default 2: the top direction grows
by |1 − ηλ| ≥ 3× per step in the quadratic model). Only measured margins are judged: the probe measures on
its schedule and again in the very step the LR has doubled since its last measurement, so an LR jump is
judged before its first update is applied. (Carrying a margin forward in proportion to the LR would
false-alarm during warm-up, where sharpness adapts to the growing LR.)

References:
    Cohen et al. 2021, arXiv 2103.00065; Cohen et al. 2022, arXiv 2207.14484; Wu & Su 2023, ICML.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel.detect.causes import cause_for
from keel.detect.detector import DETECTORS

KIND = "edge_of_stability"
MARGIN = "curvature/margin"


@dataclass(kw_only=True)
class EdgeOfStabilityConfig:
    """Settings of the edge-of-stability detector.

    Attributes:
        warn_margin: Margin at or above which the LR is beyond the edge (a warning).
        critical_margin: Margin that is critical.
    """

    warn_margin: float = 2.0
    critical_margin: float = 8.0

    def __post_init__(self) -> None:
        if not (1 <= self.warn_margin <= self.critical_margin and math.isfinite(self.critical_margin)):
            raise ValueError(f"EdgeOfStabilityConfig.warn_margin={self.warn_margin!r}, critical_margin="
                             f"{self.critical_margin!r}; allowed: 1 <= warn_margin <= critical_margin < inf")


@DETECTORS.register("edge_of_stability")
class EdgeOfStabilityDetector:
    """Flags η·λ_max beyond the stability threshold.

    Example:
        >>> from keel._core import Observation
        >>> det = EdgeOfStabilityDetector()
        >>> obs = [Observation(step=0, values={"curvature/margin": 0.9, "lr": 0.01}),
        ...        Observation(step=5, values={"curvature/margin": 1.1, "lr": 0.01}),
        ...        Observation(step=6, values={"curvature/margin": 11.0, "lr": 0.1})]
        >>> [(f.step, f.severity) for o in obs for f in det.update(o)]
        [(6, 'critical')]
    """

    name = "edge_of_stability"

    def __init__(self, config: EdgeOfStabilityConfig | None = None, **fields: object) -> None:
        self.config = config or EdgeOfStabilityConfig(**fields)  # type: ignore[arg-type]
        self._measured_step = -1
        self._reported: Severity | None = None

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        margin = obs.values.get(MARGIN)
        if margin is None or not math.isfinite(margin):
            return []
        self._measured_step = obs.step
        lr = obs.values.get(keys.LR, math.nan)
        if margin < cfg.warn_margin:
            if margin < 1:
                self._reported = None
            return []
        severity: Severity | None = None
        if margin >= cfg.critical_margin and self._reported != "critical":
            severity = "critical"
        elif self._reported is None:
            severity = "warning"
        if severity is None:
            return []
        self._reported = severity
        cause = cause_for(KIND)
        evidence: dict[str, Any] = {"margin": round(margin, 4), "lr": lr, "stable_lr": lr / margin}
        for key in ("curvature/sharpness", "curvature/preconditioned_sharpness", "curvature/trace"):
            if key in obs.values:
                evidence[key.split("/")[-1]] = round(obs.values[key], 6)
        if cause is not None:
            evidence["remedies"] = cause.remedy_dicts()
        text = f"the learning rate {lr:.3g} is {margin:.3g}× the local stability limit (≈{lr / margin:.3g})."
        return [Finding(step=obs.step, kind=KIND, severity=severity, signal=MARGIN, value=margin, baseline=1.0,
                        evidence=evidence, cause=f"{text} {cause.mechanism if cause else ''}".strip(),
                        remedy=cause.remedy_text() if cause else "")]

    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "measured_step": self._measured_step, "reported": self._reported}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = EdgeOfStabilityConfig(**state["config"])
        self._measured_step, self._reported = int(state["measured_step"]), state["reported"]
