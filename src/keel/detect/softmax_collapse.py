"""Softmax-collapse detector: rows of the output softmax exactly one-hot in the working precision.

Reads ``logits/softmax_collapse`` (the `output_logits` probe), the share of rows with
Σⱼ exp(zⱼ − max z) == 1. Such rows have a loss of exactly 0 and no gradient; what remains of the update
only scales the weights (naïve loss minimisation), which Prieto et al. (2025) show ends in numerical
instability — and, with Adam's tiny ε, in loss spikes. In language-model pre-training the fraction is 0;
any sustained collapse is worth a warning, half the rows collapsed is critical. The finding carries the
zero-loss fraction and the gradient–weight cosine when those probes run.

Only a collapse that *develops* is judged: until one measurement has been below ``warn_fraction`` the
detector stays silent but for one ``info``. A fraction that is high from the first measurement is the
model's shape (a "softmax" over one output is always one-hot: the probe no longer emits it there, but a
custom probe or an old store may) or a state from before keel watched; no snapshot is healthier, so a
rollback could only repeat itself.

References:
    Prieto et al. 2025, "Grokking at the Edge of Numerical Stability", arXiv 2501.04697; code
    github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability (``logger.py``).
"""

from __future__ import annotations

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

KIND = "softmax_collapse"
EXTRA_EVIDENCE = (keys.LOGITS_ZERO_LOSS, keys.GRAD_WEIGHT_COS, keys.LOGITS_LOG_Z_MAX)


@dataclass(kw_only=True)
class SoftmaxCollapseConfig:
    """Settings of the softmax-collapse detector.

    Attributes:
        signal: The collapse fraction's key.
        warn_fraction: Share of collapsed rows that counts.
        critical_fraction: Share that is critical.
        patience: Consecutive measurements at or above ``warn_fraction`` before a warning.
    """

    signal: str = keys.LOGITS_SOFTMAX_COLLAPSE
    warn_fraction: float = 0.01
    critical_fraction: float = 0.5
    patience: int = 2

    def __post_init__(self) -> None:
        check_types(self)
        if not 0 < self.warn_fraction <= self.critical_fraction <= 1:
            raise ValueError(
                f"SoftmaxCollapseConfig.warn_fraction={self.warn_fraction!r}, critical_fraction="
                f"{self.critical_fraction!r}; allowed: 0 < warn_fraction <= critical_fraction <= 1"
            )
        require_ints(self, "patience")


@DETECTORS.register("softmax_collapse")
class SoftmaxCollapseDetector(ReadsOneSignal):
    """Flags a growing share of softmax rows collapsed to exactly one-hot.

    Example:
        >>> from keel._core import Observation
        >>> det = SoftmaxCollapseDetector()
        >>> fractions = [0.0] * 5 + [0.004, 0.02, 0.08, 0.3, 0.7]
        >>> [(f.step, f.severity) for s, v in enumerate(fractions)
        ...  for f in det.update(Observation(step=s, values={"logits/softmax_collapse": v}))]
        [(7, 'warning'), (9, 'critical')]
    """

    name = "softmax_collapse"

    def __init__(self, config: SoftmaxCollapseConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, SoftmaxCollapseConfig, config, fields)
        self._episode = Episode()
        self._seen_healthy = False
        self._told = False

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not x == x:  # absent or NaN (no rows)
            return []
        if x < cfg.warn_fraction:
            self._seen_healthy = True
            if x == 0:
                self._episode.close()
            else:
                self._episode.calm()
            return []
        if not self._seen_healthy:
            return self._not_judged(obs.step, x)
        self._episode.qualify(onset=obs.step)
        severity = self._episode.escalate(
            critical=x >= cfg.critical_fraction, warning=self._episode.run >= cfg.patience
        )
        if severity is None:
            return []
        evidence: dict[str, Any] = {"fraction": round(x, 5), "onset_step": self._episode.onset}
        evidence.update({key: round(obs.values[key], 6) for key in EXTRA_EVIDENCE if key in obs.values})
        text = f"{x:.1%} of the output softmax rows are exactly one-hot in the working precision."
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=cfg.signal,
                value=x,
                baseline=cfg.warn_fraction,
                evidence=evidence,
                text=text,
            )
        ]

    def _not_judged(self, step: int, x: float) -> list[Finding]:
        if self._told:
            return []
        self._told = True
        return [
            Finding(
                step=step,
                kind=KIND,
                severity="info",
                signal=self.config.signal,
                value=x,
                baseline=self.config.warn_fraction,
                evidence={"fraction": round(x, 5)},
                cause=f"{x:.1%} of the output softmax rows are one-hot from the first measurement: not judged "
                "(a model with one output, or one collapsed before keel watched; no earlier state is "
                "healthier).",
                advice="",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            **self._episode.state_dict(),
            "seen_healthy": self._seen_healthy,
            "told": self._told,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = SoftmaxCollapseConfig(**state["config"])
        self._episode.load_state_dict(state)
        # states from before these fields judged every measurement
        self._seen_healthy = bool(state.get("seen_healthy", True))
        self._told = bool(state.get("told", False))
