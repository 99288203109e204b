"""Attention-entropy-collapse detector: the mean attention entropy falling to a small share of its start.

Reads ``attn/entropy`` (the `attn_entropy` probe, sampled). The baseline is the largest of the first
``baseline_points`` measurements — near the uniform-attention entropy at initialisation — so the rule is
relative and needs no knowledge of sequence length. A warning when the entropy is below
``warn_fraction`` of the baseline and still falling (Theil–Sen slope < 0 over ``window`` measurements);
critical below ``critical_fraction``. Healthy language models keep roughly half of their initial
entropy (keel's small proxy at lr 3e-3 keeps 50–55 %); Zhai et al. report collapse to near zero in the
runs that diverge.

References:
    Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse", ICML,
    arXiv 2303.06296; code github.com/apple/ml-sigma-reparam.
"""

from __future__ import annotations

import math
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

KIND = "attention_entropy_collapse"


@dataclass(kw_only=True)
class EntropyCollapseConfig:
    """Settings of the entropy-collapse detector.

    Attributes:
        signal: The entropy signal.
        baseline_points: Measurements whose maximum is the baseline.
        window: Measurements in the slope.
        warn_fraction: Entropy/baseline at or below which a falling entropy is a warning.
        critical_fraction: Entropy/baseline at or below which it is critical.
    """

    signal: str = keys.ATTN_ENTROPY
    baseline_points: int = 3
    window: int = 8
    warn_fraction: float = 0.2
    critical_fraction: float = 0.05

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "baseline_points", "window", minimum=2)
        if not 0 < self.critical_fraction <= self.warn_fraction < 1:
            raise ValueError(
                f"EntropyCollapseConfig.warn_fraction={self.warn_fraction!r}, critical_fraction="
                f"{self.critical_fraction!r}; allowed: 0 < critical_fraction <= warn_fraction < 1"
            )


@DETECTORS.register("attention_entropy_collapse")
class AttentionEntropyCollapseDetector(ReadsOneSignal):
    """Flags attention entropy collapsing towards zero.

    Example:
        >>> from keel._core import Observation
        >>> det = AttentionEntropyCollapseDetector()
        >>> entropy = [3.2, 3.2, 3.1, 2.6, 1.9, 1.3, 0.7, 0.6, 0.4, 0.25, 0.12]
        >>> [(f.step, f.severity) for s, v in enumerate(entropy)
        ...  for f in det.update(Observation(step=10 * s, values={"attn/entropy": v}))]
        [(70, 'warning'), (100, 'critical')]
    """

    name = "attention_entropy_collapse"

    def __init__(self, config: EntropyCollapseConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, EntropyCollapseConfig, config, fields)
        self._level = StartingLevel(self.config.baseline_points, self.config.window)
        self._episode = Episode(keys=("onset", "reported"))  # no patience: a falling entropy is enough

    @property
    def baseline(self) -> float:
        return max(self._level.early) if self._level.known else math.nan

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not self._level.add(obs.step, x):
            return []
        base = self.baseline
        if not base > 0:
            return []
        ratio = x / base
        slope = self._level.trend.slope()
        if ratio > cfg.warn_fraction:
            if ratio > 2 * cfg.warn_fraction:  # recovered: a later collapse is a new episode
                self._episode.close()
            return []
        self._episode.open(obs.step)
        falling = math.isfinite(slope) and slope < 0
        severity = self._episode.escalate(critical=ratio <= cfg.critical_fraction, warning=falling)
        if severity is None:
            return []
        evidence: dict[str, Any] = {
            "entropy": round(x, 5),
            "baseline": round(base, 5),
            "fraction": round(ratio, 4),
            "slope_per_step": round(slope, 6) if math.isfinite(slope) else None,
            "onset_step": self._episode.onset,
        }
        if falling and ratio > cfg.critical_fraction:
            ahead = (ratio - cfg.critical_fraction) * base / -slope
            evidence["steps_to_critical"] = round(ahead, 1)
            evidence["projected_critical_step"] = obs.step + math.ceil(ahead)
        text = (
            f"attention entropy fell to {ratio:.1%} of its initial {base:.3g} nats "
            f"({'still falling' if falling else 'at the floor'})."
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
        self.config = EntropyCollapseConfig(**state["config"])
        self._level.load_state_dict(state)
        self._episode.load_state_dict(state)
