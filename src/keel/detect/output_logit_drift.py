"""Output-logit-drift detector: log Z moving steadily away from where it started.

Reads ``logits/log_z`` (the `output_logits` probe: the mean log-partition of the output softmax). At
initialisation log Z ≈ log V; training moves it by a few nats and then it settles. Output-logit divergence
(Wortsman et al. 2023) is a log Z that keeps drifting — the logits grow in scale or shift as a whole —
until the loss suffers; a z-loss of 1e-4·(log Z)² anchors it. A warning when log Z is ``warn_dev`` nats
from its baseline (the median of the first ``baseline_points`` measurements) and still moving away at
``min_rate`` nats per step or more (Theil–Sen over ``window`` measurements) for ``patience``
measurements; critical at ``critical_dev``. The finding projects when the critical deviation is reached.

References:
    Wortsman et al. 2023, arXiv 2309.14322 (no official code); Chowdhery et al. 2022 (PaLM z-loss);
    Stollenwerk et al. 2026, "Output Embedding Centering for Stable LLM Pretraining", arXiv 2601.02031.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS
from keel.detect.scan import ReadsOneSignal
from keel.detect.trend import StartingLevel

KIND = "output_logit_drift"
EXTRA_EVIDENCE = (keys.LOGITS_MEAN, keys.LOGITS_RMS, keys.LOGITS_LOG_Z_MAX, keys.LOGITS_LOG_Z_MIN)


@dataclass(kw_only=True)
class OutputLogitDriftConfig:
    """Settings of the output-logit-drift detector.

    Attributes:
        signal: The log-partition signal.
        baseline_points: Measurements whose median is the baseline.
        window: Measurements in the drift's slope.
        warn_dev: Deviation from the baseline (nats) that counts.
        critical_dev: Deviation that is critical.
        min_rate: Drift away from the baseline (nats per step) that counts.
        patience: Consecutive qualifying measurements before a warning.
    """

    signal: str = keys.LOGITS_LOG_Z
    baseline_points: int = 5
    window: int = 30
    warn_dev: float = 5.0
    critical_dev: float = 20.0
    min_rate: float = 0.01
    patience: int = 5

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "baseline_points", "patience")
        require_ints(self, "window", minimum=2)
        if not (0 < self.warn_dev <= self.critical_dev and math.isfinite(self.critical_dev)):
            raise ValueError(
                f"OutputLogitDriftConfig.warn_dev={self.warn_dev!r}, critical_dev={self.critical_dev!r}; "
                "allowed: 0 < warn_dev <= critical_dev < inf"
            )
        if not (self.min_rate > 0 and math.isfinite(self.min_rate)):
            raise ValueError(f"OutputLogitDriftConfig.min_rate={self.min_rate!r}; allowed: a finite number > 0")


@DETECTORS.register("output_logit_drift")
class OutputLogitDriftDetector(ReadsOneSignal):
    """Flags log Z drifting steadily away from its starting level.

    Example:
        >>> from keel._core import Observation
        >>> det = OutputLogitDriftDetector()
        >>> log_z = [5.5] * 20 + [5.5 + 0.2 * k for k in range(1, 120)]
        >>> [(f.step, f.severity) for s, v in enumerate(log_z)
        ...  for f in det.update(Observation(step=s, values={"logits/log_z": v}))]
        [(48, 'warning'), (119, 'critical')]
    """

    name = "output_logit_drift"

    def __init__(self, config: OutputLogitDriftConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, OutputLogitDriftConfig, config, fields)
        self._level = StartingLevel(self.config.baseline_points, self.config.window)
        self._episode = Episode()

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not self._level.add(obs.step, x):
            return []
        base = statistics.median(self._level.early)
        dev = x - base
        if abs(dev) < cfg.warn_dev:
            if abs(dev) < cfg.warn_dev / 2:
                self._episode.close()
            else:
                self._episode.calm()
            return []
        slope = self._level.trend.slope() if len(self._level.trend.points) >= 5 else math.nan  # only needed out here
        away = math.copysign(1.0, dev) * slope if math.isfinite(slope) else math.nan
        qualifies = away >= cfg.min_rate
        if qualifies:  # a measurement that does not qualify leaves the count as it is
            self._episode.qualify(onset=self._level.trend.first_step())
        severity = self._episode.escalate(
            critical=abs(dev) >= cfg.critical_dev, warning=self._episode.run >= cfg.patience
        )
        if severity is None:
            return []
        evidence: dict[str, Any] = {
            "log_z": round(x, 4),
            "baseline": round(base, 4),
            "deviation": round(dev, 4),
            "drift_per_step": round(slope, 5) if math.isfinite(slope) else None,
            "onset_step": self._episode.onset_or(obs.step),
        }
        if qualifies and abs(dev) < cfg.critical_dev:
            ahead = (cfg.critical_dev - abs(dev)) / away
            evidence["steps_to_critical"] = round(ahead, 1)
            evidence["projected_critical_step"] = obs.step + math.ceil(ahead)
        evidence.update({key: round(obs.values[key], 5) for key in EXTRA_EVIDENCE if key in obs.values})
        text = f"log Z is {x:.3g}, {abs(dev):.3g} nats {'above' if dev > 0 else 'below'} its starting {base:.3g}" + (
            f" and drifting {abs(slope):.3g} nats/step further." if qualifies else "."
        )
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=cfg.signal,
                value=x,
                baseline=base,
                evidence=evidence,
                text=text,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            **self._level.state_dict(),
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = OutputLogitDriftConfig(**state["config"])
        self._level.load_state_dict(state)
        self._episode.load_state_dict(state)
