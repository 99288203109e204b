"""Router-logit-growth detector: a mixture-of-experts router's logits growing exponentially, before routing saturates.

Reads ``moe/router_z`` (`keel.signals.router`: the worst router's mean over tokens of logsumexp(router logits)², the
ST-MoE router z-loss without its coefficient); silent without it. It is `GrowthDetector`'s rule on the log scale,
where exponential growth is a straight line, with router-specific levels:

- at initialisation the logits are near 0 and z = (log E)² (1.9 for 4 experts, 17 for 64), and every router's z
  rises from there as it learns to choose; a healthy router settles: KempnerForge#117 reports z ≈ 2–3 with the
  z-loss and 14 → 24 without it, at the same LM loss. So growth counts only from ``min_level`` = 30 (a logsumexp
  of ~5.5) and only when fast (×1.1 per step or more, ``fast_rate``), or, from ``high_level`` = 100 (logsumexp 10:
  the top expert's probability near 1 for most tokens), when it is still growing at all (``slow_rate``);
- ``critical_level`` = 1000 (logsumexp ≈ 32): the softmax is one-hot for practically every token, the router's
  gradient has vanished, and in bfloat16 (8 significant bits) the logits are rounded in steps of 0.125 or more.

A finding gives the growth rate, when growth began, the step at which z would reach ``critical_level`` at that rate
(``projected_critical_step``), and the router (``router``) with the largest z when the step stored the per-router
family.

References:
    Zoph et al. 2022, ST-MoE, arXiv 2202.08906 (router z-loss; instability from large router logits in bfloat16);
    KempnerInstitute/KempnerForge#117 (router z 14 → 24 without z-loss, 2–3 with it).
"""

from __future__ import annotations

from dataclasses import replace

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import config_from
from keel.detect._worst_member import worst_member
from keel.detect.detector import DETECTORS
from keel.detect.growth import GrowthConfig, GrowthDetector

SIGNAL = keys.MOE_ROUTER_Z


def router_logit_growth_config(**overrides: object) -> GrowthConfig:
    """The default settings, with any `GrowthConfig` field overridden."""
    base = GrowthConfig(
        signal=SIGNAL,
        kind="router_logit_growth",
        short_window=5,
        long_window=40,
        min_level=10.0,
        fast_rate=0.05,
        high_level=50.0,
        slow_rate=0.005,
        critical_level=500.0,
        patience=3,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@DETECTORS.register("router_logit_growth")
class RouterLogitGrowthDetector(GrowthDetector):
    """Flags an MoE router's logits (its z) growing exponentially before routing saturates; names the router.

    `GrowthDetector` on ``moe/router_z`` with router levels.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = RouterLogitGrowthDetector()
        >>> z = [2.0] * 20 + [2.0 * 1.25 ** k for k in range(1, 40)]   # settled, then growing ×1.25 per step
        >>> [(f.step, f.severity) for s, v in enumerate(z)
        ...  for f in det.update(Observation(step=s, values={keys.MOE_ROUTER_Z: v}))]
        [(29, 'warning'), (44, 'critical')]
    """

    def __init__(self, config: GrowthConfig | None = None, **overrides: object) -> None:
        super().__init__(config_from(self, GrowthConfig, config, overrides, build=router_logit_growth_config))
        self._router: str | None = None  # the step's worst router, for the finding (not state: read afresh each step)

    def update(self, obs: Observation) -> list[Finding]:
        self._router = worst_member(obs, keys.MOE_ROUTER_Z_PER_LAYER)
        return super().update(obs)

    def _finding(self, step: int, severity: Severity, x: float, rate: float) -> Finding:
        finding = super()._finding(step, severity, x, rate)
        if self._router is None:
            return finding
        return replace(
            finding, evidence={"router": self._router, **finding.evidence}, cause=f"{self._router}: {finding.cause}"
        )
