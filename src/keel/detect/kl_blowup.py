"""KL-blow-up detector: the policy's KL to its reference jumping or growing exponentially, or turning non-finite.

Reads ``rl/kl`` (`keel.signals.policy_signals`, or TRL's GRPO ``kl``, which TRL logs only when β ≠ 0; without it
this detector stays silent). Three rules, on the log scale where KL moves by factors:

- **non-finite**: NaN or ±Inf is ``critical`` at once — TRL's k3 estimator exp(ref − logp) has no clamp and
  overflows when the policy drifts (trl#3015); the update computed from it is not one to apply.
- **jump**: the value is ``z`` robust standard deviations and ``min_ratio`` times above the median of the last
  ``window`` accepted values (flagged ones are kept out of that baseline), as OpenRLHF#931's KL spikes;
- **growth**: the Theil–Sen slope of log KL over ``growth_window`` measurements is at least ``growth_rate`` per step.

Jumps and growth count only at or above ``min_level`` nats (the early rise of a KL that starts at 0 is not a
blow-up), warn after ``patience`` consecutive measurements, and are critical at ``critical_level`` nats (verl clamps
its k3 at 10). A new level that lasts ``rebase_after`` measurements, and no longer grows, becomes the baseline.

References:
    huggingface/trl#3015 (k3 overflow); verl ``kl_penalty_forward`` (log-ratio clamped to ±20, k3 to ±10);
    OpenRLHF/OpenRLHF#931; rlwatch 0.5.1's KL rule (3σ/4.5σ of a rolling window) for comparison.
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
from keel.detect._running_median import RunningMedian
from keel.detect.detector import DETECTORS
from keel.detect.robust import robust_z
from keel.detect.scan import ReadsOneSignal
from keel.detect.trend import TrendWindow

KIND = "kl_blowup"
LOG_FLOOR = 1e-8  # KL at or below this (k3 is 0 for identical policies, a rounding error below) is this on a log scale


@dataclass(kw_only=True)
class KLBlowupConfig:
    """Settings of the KL-blow-up detector.

    Attributes:
        signal: The KL signal (nats, ≥ 0).
        window: Accepted measurements whose median and MAD (of log KL) are the baseline.
        min_history: Accepted measurements needed before a jump counts.
        z: Robust z-score (log units) of a jump.
        min_ratio: Factor above the baseline median a jump must also reach.
        scale_floor: Least robust scale assumed, in log units.
        growth_window: Measurements in the growth slope.
        growth_rate: Growth of log KL per step that counts (0.05: ×1.05 per step).
        min_level: KL (nats) from which jumps and growth count.
        critical_level: KL (nats) that is critical.
        patience: Consecutive qualifying measurements before a warning.
        rebase_after: Consecutive qualifying measurements after which a level that no longer grows is the baseline.
    """

    signal: str = keys.RL_KL
    window: int = 50
    min_history: int = 10
    z: float = 6.0
    min_ratio: float = 4.0
    scale_floor: float = 0.1
    growth_window: int = 20
    growth_rate: float = 0.05
    min_level: float = 0.05
    critical_level: float = 10.0
    patience: int = 2
    rebase_after: int = 50

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "window", "min_history", "patience", "rebase_after")
        require_ints(self, "growth_window", minimum=3)
        require_positive(self, "z", "min_ratio", "scale_floor", "growth_rate", "min_level", "critical_level")
        if self.min_history > self.window or self.min_level > self.critical_level:
            raise ValueError(
                f"KLBlowupConfig.min_history={self.min_history}, window={self.window}, min_level={self.min_level}, "
                f"critical_level={self.critical_level}; allowed: min_history <= window, min_level <= critical_level"
            )


@DETECTORS.register("kl_blowup")
class KLBlowupDetector(ReadsOneSignal):
    """Flags the KL to the reference policy blowing up.

    Add it to a Guard beside the defaults: ``Guard(..., detectors=[*default_detectors(), *policy_detectors()])``.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = KLBlowupDetector()
        >>> kl = [0.08 * (1.1 if s % 2 else 0.9) for s in range(60)] + [0.9, 1.5, 4.0, 12.0, float("inf")]
        >>> [(f.step, f.severity) for s, v in enumerate(kl) for f in det.update(Observation(step=s, values={
        ...     keys.RL_KL: v}))]
        [(61, 'warning'), (63, 'critical'), (64, 'critical')]
    """

    name = "kl_blowup"

    def __init__(self, config: KLBlowupConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, KLBlowupConfig, config, fields)
        self._accepted = RunningMedian(size=self.config.window, capacity=self.config.window)
        self._growth = TrendWindow(self.config.growth_window)
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
            text = f"the KL to the reference policy is {x} (the estimator overflowed or the policy's log-probs are)."
            return [self._finding(obs.step, "critical", x, {"non_finite": repr(x), "onset_step": obs.step}, text)]
        self._non_finite = False
        y = math.log(max(x, LOG_FLOOR))
        self._growth.add(obs.step, y)
        if len(self._accepted) < cfg.min_history:
            self._accepted.push(y)
            return []
        median, scale = self._accepted.location_scale()
        z = robust_z(y, median, scale, cfg.scale_floor)
        ratio = math.exp(min(y - median, 700.0))
        rate = self._growth.slope() if len(self._growth.points) >= cfg.growth_window // 2 else math.nan
        jump = z >= cfg.z and ratio >= cfg.min_ratio
        growing = math.isfinite(rate) and rate >= cfg.growth_rate
        if x < cfg.min_level or not (jump or growing):
            self._accepted.push(y)
            if ratio < 2:
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        if self._episode.run >= cfg.rebase_after and not growing:  # a lasting new level: the baseline from now on
            recent = [v for _, v in self._growth.points]
            self._accepted = RunningMedian(size=cfg.window, capacity=cfg.window, values=recent)
            self._episode.close()
            return []
        severity = self._episode.escalate(critical=x >= cfg.critical_level, warning=self._episode.run >= cfg.patience)
        if severity is None:
            return []
        evidence: dict[str, Any] = {
            "kl": round(x, 6),
            "baseline_median": round(math.exp(median), 8),
            "ratio": round(ratio, 3),
            "z": round(z, 2),
            "growth_per_step": round(rate, 5) if math.isfinite(rate) else None,
            "onset_step": self._episode.onset,
        }
        if math.isfinite(rate) and rate > 0 and x < cfg.critical_level:
            project(evidence, obs.step, math.log(cfg.critical_level / x) / rate)
        how = (
            f"{ratio:.3g}× its recent median {math.exp(median):.3g}"
            if jump
            else f"growing ×{math.exp(min(rate, 700.0)):.3g}/step"
        )
        text = f"the KL to the reference policy is {x:.4g} nats ({how})."
        return [self._finding(obs.step, severity, x, evidence, text, baseline=math.exp(median))]

    def _finding(
        self, step: int, severity: Severity, x: float, evidence: dict[str, Any], text: str, baseline: float = math.nan
    ) -> Finding:
        if math.isnan(baseline) and len(self._accepted):
            baseline = math.exp(self._accepted.location_scale()[0])
        return explained_finding(
            step=step,
            kind=KIND,
            severity=severity,
            signal=self.config.signal,
            value=x,
            baseline=baseline,
            evidence=evidence,
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "accepted": list(self._accepted.values),
            "growth": self._growth.state_dict(),
            "non_finite": self._non_finite,
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = KLBlowupConfig(**state["config"])
        self._accepted = RunningMedian(size=self.config.window, capacity=self.config.window, values=state["accepted"])
        self._growth.load_state_dict(state["growth"])
        self._non_finite = bool(state["non_finite"])
        self._episode.load_state_dict(state)
