"""Dead-experts detector: mixture-of-experts experts that get no token, measurement after measurement, and more of them.

Reads ``moe/dead_experts`` (`keel.signals.router`: the experts, over all routers, that received no token in the
step); silent without it. An expert that gets no token gets no gradient, and the router that never picks it has no
reason to start: it does not come back on its own. One step without tokens means little (a small batch, a skewed
one), so the count judged is the dead count's minimum over the last ``window`` measurements: at least that many
experts were dead at every one of them.

At initialisation a router's logits are near 0 and alike for all tokens, so some experts get nothing (keel's proxy
MoE with the balancing loss: one per layer for its first ~30 steps at 4 experts top-2, one to six of 16 for its
first ~90 steps at 8 experts top-1); a healthy router revives them. The first ``warmup`` measurements are therefore
not judged.

- **warning**: after ``warmup``, that persistent count is at least ``warn_count``;
- **critical**: it has risen by ``critical_rise`` or more since the warning and the dead count is not falling
  (Theil–Sen slope over the window ≥ 0) — experts keep dying.

The finding names the router with the most dead experts when the step stored the per-router family, and gives the
dead count's Theil–Sen slope over the window (experts dying per step). An episode ends when the count is back to 0.

References:
    Wang et al. 2024, Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts, arXiv 2408.15664;
    Fedus et al. 2021, Switch Transformers, arXiv 2101.03961; NVIDIA-NeMo/Automodel#1232 (dead experts logged).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect._worst_member import worst_member
from keel.detect.detector import DETECTORS
from keel.detect.trend import TrendWindow

KIND = "dead_experts"


@dataclass(kw_only=True)
class DeadExpertsConfig:
    """Settings of the dead-experts detector.

    Attributes:
        window: Measurements over which an expert must stay without tokens to count (the count's minimum).
        warmup: First measurements not judged (the router's start, before it has re-balanced).
        warn_count: Persistent dead count that is a warning.
        critical_rise: Rise of that count since the warning that is critical.
    """

    window: int = 20
    warmup: int = 100
    warn_count: int = 1
    critical_rise: int = 1

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "window", "warn_count", "critical_rise")
        require_ints(self, "warmup", minimum=0)


@DETECTORS.register("dead_experts")
class DeadExpertsDetector:
    """Flags experts that stay without tokens after the router's start, critical when more keep dying.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = DeadExpertsDetector()
        >>> dead = [1] * 80 + [0] * 40 + [1] * 40 + [2] * 40    # one dead at the start (healthy), then 1, then 2
        >>> [(f.step, f.severity) for s, d in enumerate(dead)
        ...  for f in det.update(Observation(step=s, values={keys.MOE_DEAD_EXPERTS: float(d)}))]
        [(139, 'warning'), (179, 'critical')]
    """

    name = "dead_experts"
    reads = (keys.MOE_DEAD_EXPERTS,)  # `keel.detect.scan.ReadsKeys`
    rests_when_finite = False

    def __init__(self, config: DeadExpertsConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, DeadExpertsConfig, config, fields)
        self._dead = TrendWindow(self.config.window)
        self._seen = 0  # finite measurements so far (the warm-up counts them)
        self._warned_at = -1  # the persistent count at this episode's warning; -1 before it
        self._episode = Episode(keys=("onset", "reported"))

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(keys.MOE_DEAD_EXPERTS)
        if x is None or not self._dead.add(obs.step, x):
            return []
        self._seen += 1
        if self._seen < max(cfg.warmup, cfg.window):
            return []
        persistent = int(min(v for _, v in self._dead.points))
        if persistent < cfg.warn_count:
            if persistent == 0:
                self._episode.close()
                self._warned_at = -1
            return []
        self._episode.open(self._dead.first_step())
        if self._warned_at < 0:
            self._warned_at = persistent
        # a count that is falling is experts reviving, whatever the window's minimum does as old values leave it
        rising = persistent >= self._warned_at + cfg.critical_rise and self._dead.slope() >= 0
        severity = self._episode.escalate(critical=rising, warning=True)
        if severity is None:
            return []
        return [self._finding(obs, severity, x, persistent)]

    def _finding(self, obs: Observation, severity: Severity, x: float, persistent: int) -> Finding:
        cfg = self.config
        slope = self._dead.slope()
        evidence: dict[str, Any] = {
            "dead_experts": persistent,
            "window": cfg.window,
            "dying_per_step": round(slope, 5) if math.isfinite(slope) else None,
            "onset_step": self._episode.onset_or(obs.step),
        }
        router = worst_member(obs, keys.MOE_DEAD_EXPERTS_PER_LAYER)
        if router is not None:
            evidence["router"] = router
        where = f" (most in {router})" if router is not None else ""
        text = f"{persistent} expert(s) got no token in any of the last {cfg.window} measurements{where}" + (
            f", up from {self._warned_at}." if persistent > self._warned_at else "."
        )
        return explained_finding(
            step=obs.step,
            kind=KIND,
            severity=severity,
            signal=keys.MOE_DEAD_EXPERTS,
            value=x,
            baseline=float(self._warned_at if severity == "critical" else 0),
            evidence=evidence,
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "dead": self._dead.state_dict(),
            "seen": self._seen,
            "warned_at": self._warned_at,
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = DeadExpertsConfig(**state["config"])
        self._dead.load_state_dict(state["dead"])
        self._seen = int(state["seen"])
        self._warned_at = int(state["warned_at"])
        self._episode.load_state_dict(state)
