"""LoRA blow-up detector: an adapter's weight update ‖ΔW‖ = scaling·‖B·A‖ racing away from its base weight.

Reads ``lora/delta_ratio_max`` (`keel.signals.LoraProbe`: the largest ‖ΔW‖/‖W_base‖ over the adapters); silent
without it. B starts at zero, so every adapter's ΔW grows from 0 at the start of a fine-tune, and that growth is
healthy: with Adam each element moves by about the LR per step, so at a sound LR the ratio climbs by a fraction of
a per cent per step (a healthy LLM weight moves ~1e-3 of its norm per step, Karpathy's rule of thumb). What blows
up is a ratio that climbs by several per cent *of the base weight* per step: at that pace the adapter outweighs the
weight it adapts within tens of steps, and the loss follows. Three rules, on the ratio's own scale:

- **non-finite**: NaN or ±Inf (A or B holds NaN/Inf) is ``critical`` at once;
- **fast**: the ratio is at least ``min_level`` and its Theil–Sen slope over the last ``window`` measurements is at
  least ``fast_rate`` per step, for ``patience`` measurements in a row: a warning, with the step at which the ratio
  would reach ``critical_level`` at that rate (``projected_critical_step``): predictive, it fires while the loss is
  still near its level;
- **critical**: the ratio reaches ``critical_level`` (the adapter's update as large as its base weight) while it is
  still growing fast.

A slow, steady growth never qualifies, whatever the level it reaches: a long healthy fine-tune may move its
weights far. An episode ends when the ratio falls back below ``min_level``. A base stored in 4 bits has no ratio;
point ``signal`` at ``lora/delta_norm_max`` with thresholds in the model's own units to watch ‖ΔW‖ instead.

References:
    Hu et al. 2021, LoRA, arXiv 2106.09685 (ΔW = (α/r)·B·A, B = 0 at init); Kalajdzievski 2023, rsLoRA,
    arXiv 2312.03732 (α/√r); Huang et al. 2024, ALLoRA, arXiv 2410.09692 (LoRA's early blow-up from B = 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._drift import project
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS
from keel.detect.scan import ReadsOneSignal
from keel.detect.trend import TrendWindow

KIND = "lora_blowup"


@dataclass(kw_only=True)
class LoraBlowupConfig:
    """Settings of the LoRA blow-up detector.

    Attributes:
        signal: The ratio watched (‖ΔW‖/‖W_base‖, largest over adapters).
        window: Measurements in the growth slope.
        min_level: Ratio from which fast growth counts.
        fast_rate: Growth of the ratio per step that counts (0.05: 5 % of the base weight's norm per step).
        critical_level: Ratio that is critical while it still grows fast.
        patience: Consecutive qualifying measurements before a warning.
    """

    signal: str = keys.LORA_DELTA_RATIO_MAX
    window: int = 5
    min_level: float = 0.1
    fast_rate: float = 0.05
    critical_level: float = 2.0
    patience: int = 2

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "patience")
        require_ints(self, "window", minimum=3)
        require_positive(self, "min_level", "fast_rate", "critical_level")
        if self.min_level > self.critical_level:
            raise ValueError(
                f"LoraBlowupConfig.min_level={self.min_level}, critical_level={self.critical_level}; "
                "allowed: min_level <= critical_level"
            )


@DETECTORS.register("lora_blowup")
class LoraBlowupDetector(ReadsOneSignal):
    """Flags a LoRA adapter's update growing fast relative to its base weight, before the loss blows up.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = LoraBlowupDetector()
        >>> ratio = [0.004 * s for s in range(30)] + [0.12 + 0.08 * k for k in range(1, 30)]  # healthy, then racing
        >>> [(f.step, f.severity) for s, r in enumerate(ratio) for f in det.update(Observation(step=s, values={
        ...     keys.LORA_DELTA_RATIO_MAX: r}))]
        [(33, 'warning'), (53, 'critical')]
    """

    name = "lora_blowup"

    def __init__(self, config: LoraBlowupConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, LoraBlowupConfig, config, fields)
        self._trend = TrendWindow(self.config.window)
        self._episode = Episode()
        self._non_finite = False  # the current run of non-finite values has been reported

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None:
            return []
        if not math.isfinite(x):
            if self._non_finite:
                return []
            self._non_finite = True
            text = f"an adapter's update ‖ΔW‖/‖W‖ is {x}: its A or B holds NaN or ±Inf."
            return [self._finding(obs, "critical", x, {"non_finite": repr(x), "onset_step": obs.step}, text)]
        self._non_finite = False
        self._trend.add(obs.step, x)
        if x < cfg.min_level:
            self._episode.close()
            return []
        if len(self._trend.points) < 3:
            return []
        rate = self._trend.slope()
        if not rate >= cfg.fast_rate:
            self._episode.break_run()
            return []
        self._episode.qualify(onset=self._trend.first_step())
        severity = self._episode.escalate(critical=x >= cfg.critical_level, warning=self._episode.run >= cfg.patience)
        if severity is None:
            return []
        evidence: dict[str, Any] = {
            "ratio": round(x, 6),
            "growth_per_step": round(rate, 5),
            "critical_level": cfg.critical_level,
            "onset_step": self._episode.onset_or(obs.step),
        }
        if x < cfg.critical_level:
            project(evidence, obs.step, (cfg.critical_level - x) / rate)
        module = _largest(obs, keys.LORA_DELTA_NORM_PER_MODULE)
        if module is not None:
            evidence["largest_delta_module"] = module
        when = (
            f"at this pace {cfg.critical_level:g} in ~{evidence['steps_to_critical']:.0f} steps"
            if "steps_to_critical" in evidence
            else "still growing"
        )
        text = f"the largest LoRA update ‖ΔW‖/‖W_base‖ is {x:.3g}, growing {rate:.3g} per step ({when})" + (
            f"; largest ‖ΔW‖ in {module}." if module is not None else "."
        )
        return [self._finding(obs, severity, x, evidence, text)]

    def _finding(self, obs: Observation, severity: Severity, x: float, evidence: dict[str, Any], text: str) -> Finding:
        points = self._trend.points
        return explained_finding(
            step=obs.step,
            kind=KIND,
            severity=severity,
            signal=self.config.signal,
            value=x,
            baseline=math.nan if not points else points[0][1],
            evidence=evidence,
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "trend": self._trend.state_dict(),
            "non_finite": self._non_finite,
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = LoraBlowupConfig(**state["config"])
        self._trend.load_state_dict(state["trend"])
        self._non_finite = bool(state["non_finite"])
        self._episode.load_state_dict(state)


def _largest(obs: Observation, family: str) -> str | None:
    """The member of ``family`` with the largest finite value this step, or None without one."""
    names, values = obs.per_param.get(family, ((), []))
    finite = [(v, n) for n, v in zip(names, values, strict=False) if math.isfinite(v)]
    return max(finite)[1] if finite else None
