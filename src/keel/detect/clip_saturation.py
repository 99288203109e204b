"""Clip-saturation detector: a large and growing share of tokens whose PPO ratio is clipped.

Reads ``rl/clip_low`` and ``rl/clip_high`` (`keel.signals.policy_signals`, or TRL's ``clip_ratio/low_mean`` and
``clip_ratio/high_mean``); silent without them. A clipped token contributes no gradient, so when most tokens are
clipped the policy has moved too far from the one that sampled the batch — too high a learning rate or too many
passes per batch — and the updates that remain come from a shrinking, biased set of tokens (huggingface/trl#2980:
``clip_ratio`` and ``grad_norm`` climbing together). A clip share that is identically 0 is normal: with one pass per
batch (``num_iterations=1``) the ratio is 1 by construction (trl#3120).

The level is the median of the last ``window`` measurements of the two shares' sum. A warning when it has been at or
above ``warn_level`` and at least ``rise_factor`` times its start (the median of the first ``baseline_points``) for
``patience`` measurements; critical at ``critical_level``. The finding names the side: mostly ``high`` (ratio above
1 + ε_high with positive advantages) is what DAPO's clip-higher widens.

References:
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv 1707.06347. Yu et al. 2025, DAPO,
    arXiv 2503.14476 (clip-higher, ε_high = 0.28). huggingface/trl#2980, #3120.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints
from keel.detect._drift import Drift
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS

KIND = "clip_saturation"
SIDES = (keys.RL_CLIP_LOW, keys.RL_CLIP_HIGH)


@dataclass(kw_only=True)
class ClipSaturationConfig:
    """Settings of the clip-saturation detector.

    Attributes:
        baseline_points: Measurements whose median is the starting clip share.
        window: Recent measurements: their median is the level.
        warn_level: Clipped share (low + high) at or above which it counts.
        rise_factor: Level / start at or above which it counts (a run that clips this much from the start has
            been tuned that way).
        critical_level: Clipped share that is critical.
        patience: Consecutive qualifying measurements before a warning.
    """

    baseline_points: int = 10
    window: int = 20
    warn_level: float = 0.2
    rise_factor: float = 2.0
    critical_level: float = 0.5
    patience: int = 5

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "baseline_points", "window", "patience")
        if not 0 < self.warn_level <= self.critical_level <= 1 or not self.rise_factor >= 1:
            raise ValueError(
                f"ClipSaturationConfig.warn_level={self.warn_level!r}, critical_level={self.critical_level!r}, "
                f"rise_factor={self.rise_factor!r}; allowed: 0 < warn_level <= critical_level <= 1, rise_factor >= 1"
            )


@DETECTORS.register("clip_saturation")
class ClipSaturationDetector:
    """Flags a PPO/GRPO run that clips a large, growing share of its tokens.

    Add it to a Guard beside the defaults: ``Guard(..., detectors=[*default_detectors(), *policy_detectors()])``.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = ClipSaturationDetector()
        >>> found = []
        >>> for s in range(100):
        ...     high = 0.05 + 0.01 * max(0, s - 30)  # climbing from step 30
        ...     found += det.update(Observation(step=s, values={keys.RL_CLIP_LOW: 0.01, keys.RL_CLIP_HIGH: high}))
        >>> [(f.step, f.severity, f.evidence["side"]) for f in found]
        [(58, 'warning', 'high'), (84, 'critical', 'high')]
    """

    name = "clip_saturation"
    reads = SIDES
    rests_when_finite = False

    def __init__(self, config: ClipSaturationConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, ClipSaturationConfig, config, fields)
        self._total = Drift(self.config.baseline_points, self.config.window)
        self._episode = Episode()

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        shares = {k: obs.values[k] for k in SIDES if k in obs.values}
        if not shares or not all(math.isfinite(v) for v in shares.values()):
            return []
        if not self._total.add(obs.step, sum(shares.values())) or not self._total.known:
            return []
        level, start = self._total.level, self._total.start
        if level < cfg.warn_level or level < cfg.rise_factor * start:
            if level < cfg.warn_level / 2:
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        severity = self._episode.escalate(
            critical=level >= cfg.critical_level, warning=self._episode.run >= cfg.patience
        )
        if severity is None:
            return []
        low, high = shares.get(keys.RL_CLIP_LOW, 0.0), shares.get(keys.RL_CLIP_HIGH, 0.0)
        side = "high" if high > 2 * low else "low" if low > 2 * high else "both"
        evidence: dict[str, Any] = {
            "clipped": round(level, 4),
            "start": round(start, 4),
            "side": side,
            **{k: round(v, 4) for k, v in shares.items()},
            "onset_step": self._episode.onset,
        }
        text = f"{level:.1%} of the response tokens are clipped (the run started at {start:.1%}; mostly {side})."
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=keys.RL_CLIP_HIGH if side == "high" else keys.RL_CLIP_LOW,
                value=level,
                baseline=start,
                evidence=evidence,
                text=text,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "total": self._total.state_dict(),
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = ClipSaturationConfig(**state["config"])
        self._total.load_state_dict(state["total"])
        self._episode.load_state_dict(state)
