"""Policy-entropy-collapse detector: the policy's token entropy falling to a small share of the run's own start.

Reads ``rl/entropy`` (`keel.signals.policy_signals`, or TRL's GRPO ``entropy``). The threshold is relative — the
median of the recent ``window`` measurements against the median of the first ``baseline_points`` — because the
entropy a policy starts with depends on the model, the vocabulary and the task: rlwatch's fixed 1.0 nats would
flag a character-level model at 3.8 nats only after it had lost most of its entropy, and a chat model that starts
at 0.6 nats from the first step. A warning when the entropy is at or below ``warn_fraction`` of its start and still
falling (its Theil–Sen slope ``fall_z`` standard errors below zero) for ``patience`` measurements; critical at or
below ``critical_fraction``. The warning says when, at the current slope, the critical share would be reached: that
is its lead time. Healthy GRPO runs lose entropy too, typically keeping a third or more (DAPO's clip-higher runs);
a run whose entropy collapses stops exploring, and its reward stalls soon after.

References:
    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476 (entropy
    collapse, clip-higher). Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models", arXiv 2505.22617.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._drift import Drift, project
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS
from keel.detect.scan import ReadsOneSignal

KIND = "policy_entropy_collapse"


@dataclass(kw_only=True)
class PolicyEntropyCollapseConfig:
    """Settings of the policy-entropy-collapse detector.

    Attributes:
        signal: The entropy signal (nats).
        baseline_points: Measurements whose median is the starting entropy.
        window: Recent measurements: their median is the level, their slope the trend.
        warn_fraction: Level/start at or below which a falling entropy counts.
        critical_fraction: Level/start at or below which it is critical.
        fall_z: Standard errors of its own noise by which the window must be falling.
        patience: Consecutive qualifying measurements before a warning.
    """

    signal: str = keys.RL_ENTROPY
    baseline_points: int = 10
    window: int = 10
    warn_fraction: float = 0.35
    critical_fraction: float = 0.1
    fall_z: float = 2.0
    patience: int = 3

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "baseline_points", "patience")
        require_ints(self, "window", minimum=3)
        require_positive(self, "fall_z")
        if not 0 < self.critical_fraction <= self.warn_fraction < 1:
            raise ValueError(
                f"PolicyEntropyCollapseConfig.warn_fraction={self.warn_fraction!r}, critical_fraction="
                f"{self.critical_fraction!r}; allowed: 0 < critical_fraction <= warn_fraction < 1"
            )


@DETECTORS.register("policy_entropy_collapse")
class PolicyEntropyCollapseDetector(ReadsOneSignal):
    """Flags a policy's entropy collapsing relative to where the run started.

    Add it to a Guard beside the defaults: ``Guard(..., detectors=[*default_detectors(), *policy_detectors()])``.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = PolicyEntropyCollapseDetector()
        >>> entropy = [3.8] * 20 + [3.8 * 0.97**k for k in range(1, 120)]  # ×0.97 per step from step 20
        >>> [(f.step, f.severity, f.evidence.get("projected_critical_step")) for s, v in enumerate(entropy)
        ...  for f in det.update(Observation(step=s, values={keys.RL_ENTROPY: v}))]
        [(60, 'warning', 83), (100, 'critical', None)]
    """

    name = "policy_entropy_collapse"

    def __init__(self, config: PolicyEntropyCollapseConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, PolicyEntropyCollapseConfig, config, fields)
        self._drift = Drift(self.config.baseline_points, self.config.window)
        self._episode = Episode()

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not self._drift.add(obs.step, x) or not self._drift.known:
            return []
        start, level = self._drift.start, self._drift.level
        if not start > 0:
            return []  # a deterministic policy from the start has no entropy to lose
        ratio = level / start
        floor = 1e-3 * start
        falling = self._drift.trend_z(floor) <= -cfg.fall_z
        if ratio > cfg.warn_fraction or not (falling or ratio <= cfg.critical_fraction):
            if ratio > 2 * cfg.warn_fraction:  # recovered: a later collapse is a new episode
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        severity = self._episode.escalate(
            critical=ratio <= cfg.critical_fraction, warning=self._episode.run >= cfg.patience
        )
        if severity is None:
            return []
        slope = self._drift.slope()
        evidence: dict[str, Any] = {
            "entropy": round(level, 6),
            "start": round(start, 6),
            "fraction": round(ratio, 4),
            "slope_per_step": round(slope, 8) if math.isfinite(slope) else None,
            "onset_step": self._episode.onset,
        }
        if slope < 0 and ratio > cfg.critical_fraction:
            project(evidence, obs.step, (ratio - cfg.critical_fraction) * start / -slope)
        text = (
            f"the policy's token entropy fell to {ratio:.1%} of the {start:.3g} nats it started with "
            f"({'still falling' if falling else 'at the floor'})."
        )
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=cfg.signal,
                value=x,
                baseline=start,
                evidence=evidence,
                text=text,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "drift": self._drift.state_dict(), **self._episode.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = PolicyEntropyCollapseConfig(**state["config"])
        self._drift.load_state_dict(state["drift"])
        self._episode.load_state_dict(state)
