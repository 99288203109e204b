"""Growth detector: a positive signal growing exponentially — the predictive rule behind logit-growth alarms.

Works on the log scale, where exponential growth is a straight line and its Theil–Sen slope is the growth
rate per step. Three rules, each needing its level gate so that the fast early growth every signal has
from its initialisation (attention logits start near 0) is not an alarm:

- **fast**: level ≥ ``min_level`` and the short-window rate ≥ ``fast_rate`` for ``patience`` measurements;
- **sustained**: level ≥ ``high_level`` and the long-window rate ≥ ``slow_rate`` (still growing where
  healthy runs have levelled off);
- **critical**: level ≥ ``critical_level``.

A finding says when growth began (``onset_step``; its ``baseline`` is the level there), how fast it goes
(``rate_per_step``, ``doubling_steps``) and when, at that rate, the signal would reach ``critical_level``
(``projected_critical_step``): that is how early it fired. Each severity is reported once per episode; an
episode ends when the level falls back below ``min_level``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import check_types
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.causes import cause_for
from keel.detect.scan import ReadsOneSignal
from keel.detect.trend import TrendWindow


@dataclass(kw_only=True)
class GrowthConfig:
    """Settings of one growth detector.

    Attributes:
        signal: The signal key watched (positive values).
        kind: The finding kind (a key of `keel.detect.causes.CAUSES` gives its advice).
        short_window: Points in the fast rule's slope.
        long_window: Points in the sustained rule's slope.
        min_level: Level from which fast growth counts.
        fast_rate: Growth rate per step (natural log) of the fast rule.
        high_level: Level from which sustained growth counts.
        slow_rate: Growth rate per step of the sustained rule.
        critical_level: Level that is critical on its own.
        patience: Consecutive qualifying measurements before a warning.
    """

    signal: str
    kind: str
    short_window: int = 5
    long_window: int = 40
    min_level: float = 5.0
    fast_rate: float = 0.35
    high_level: float = 100.0
    slow_rate: float = 0.005
    critical_level: float = 1000.0
    patience: int = 2

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("short_window", "long_window", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if "window" in name else 1):
                raise ValueError(f"GrowthConfig.{name}={value!r}; allowed: an int >= {2 if 'window' in name else 1}")
        for name in ("min_level", "fast_rate", "high_level", "slow_rate", "critical_level"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"GrowthConfig.{name}={value!r}; allowed: a finite number > 0")
        if not self.min_level <= self.high_level <= self.critical_level:
            raise ValueError(
                f"GrowthConfig.min_level={self.min_level}, high_level={self.high_level}, "
                f"critical_level={self.critical_level}; "
                "allowed: min_level <= high_level <= critical_level"
            )


class GrowthDetector(ReadsOneSignal):
    """Flags exponential growth of a positive signal before it reaches a critical level.

    Example:
        >>> from keel._core import Observation
        >>> det = GrowthDetector(GrowthConfig(signal="attn/max_logit", kind="attention_logit_growth"))
        >>> values = [1.0] * 10 + [1.0 * 2 ** k for k in range(1, 12)]
        >>> found = [f for s, v in enumerate(values)
        ...          for f in det.update(Observation(step=s, values={"attn/max_logit": v}))]
        >>> [(f.step, f.severity) for f in found]
        [(13, 'warning'), (19, 'critical')]
    """

    name = "growth"

    def __init__(self, config: GrowthConfig) -> None:
        self.name = config.kind
        self.config = config
        self._short = TrendWindow(config.short_window, log=True)
        self._long = TrendWindow(config.long_window, log=True)
        self._episode = Episode()
        self._onset_level = math.nan  # the level at the onset step: the finding's baseline

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not self._short.add(obs.step, x):
            return []
        self._long.add(obs.step, x)
        if x < cfg.min_level:
            self._episode.close()
            return []
        if len(self._short.points) < 3:
            return []
        fast = self._short.slope()
        # the long window's slope only matters above high_level: spare the O(window²) median below it
        slow = self._long.slope() if x >= cfg.high_level and len(self._long.points) >= 10 else math.nan
        qualifies = (fast >= cfg.fast_rate) or (x >= cfg.high_level and slow >= cfg.slow_rate)
        if not qualifies:
            self._episode.break_run()
        elif self._episode.qualify(onset=self._short.first_step()):
            self._onset_level = math.exp(self._short.points[0][1])  # the window holds log values
        severity = self._episode.escalate(critical=x >= cfg.critical_level, warning=self._episode.run >= cfg.patience)
        if severity is None:
            return []
        rate = fast if fast >= cfg.fast_rate or not math.isfinite(slow) else slow
        return [self._finding(obs.step, severity, x, rate)]

    def _finding(self, step: int, severity: Severity, x: float, rate: float) -> Finding:
        cfg = self.config
        evidence: dict[str, Any] = {
            "level": round(x, 6),
            "rate_per_step": round(rate, 5),
            "onset_step": self._episode.onset_or(step),
            "critical_level": cfg.critical_level,
        }
        if rate > 0:
            evidence["doubling_steps"] = round(math.log(2) / rate, 2)
            if x < cfg.critical_level:
                ahead = math.log(cfg.critical_level / x) / rate
                evidence["steps_to_critical"] = round(ahead, 1)
                evidence["projected_critical_step"] = step + math.ceil(ahead)
        cause = cause_for(cfg.kind)
        growth = f"×{math.exp(rate):.3g} per step" if rate > 0 else "no longer growing"
        what = cause.title if cause else cfg.kind
        text = f"{what}: {cfg.signal} = {x:.4g} ({growth}; " + (
            f"at this rate {cfg.critical_level:g} in ~{evidence['steps_to_critical']:.0f} steps)."
            if "steps_to_critical" in evidence
            else f"above the critical level {cfg.critical_level:g})."
        )
        return explained_finding(
            step=step,
            kind=cfg.kind,
            severity=severity,
            signal=cfg.signal,
            value=x,
            baseline=self._onset_level if self._episode.onset >= 0 else x,
            evidence=evidence,
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "short": self._short.state_dict(),
            "long": self._long.state_dict(),
            **self._episode.state_dict(),
            "onset_level": self._onset_level,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = GrowthConfig(**state["config"])
        self._short.load_state_dict(state["short"])
        self._long.load_state_dict(state["long"])
        self._episode.load_state_dict(state)
        self._onset_level = float(state.get("onset_level", math.nan))  # absent from states saved before it
