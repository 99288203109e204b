"""Length-explosion detector: responses growing toward the generation limit, and more of them cut off there.

Reads ``rl/length_mean``, ``rl/truncated`` and ``rl/length_max`` (`keel.signals.policy_signals`, or TRL's
``completions/mean_length``, ``completions/clipped_ratio`` and ``completions/max_length``); silent without the first
two. Longer responses are often healthy in reasoning RL (the policy learns to think longer); what breaks a run is
length racing to the limit: truncated responses get no end-of-sequence reward, their tokens dominate a token-level
loss, and the reward signal turns to noise. Rules, over the last ``window`` measurements against the first
``baseline_points``, trends in standard errors of each series' own noise (``z``):

- the mean length is at least ``near_limit`` of the limit and still rising — the limit is ``max_length`` when given,
  else the longest response seen in a step with truncated responses (a cut response is as long as the limit);
- the truncated share is at least ``truncated_warn``, ``truncated_rise`` above its start and still rising.

``patience`` consecutive measurements make a warning; critical when the truncated share reaches
``critical_truncated`` having started below half of it. A run truncated from its first step is not exploding: its
limit is too short for the task, which `keel.detect.DeadGroupsDetector` names truncation starvation.

References:
    Yu et al. 2025, DAPO, arXiv 2503.14476 (overlong reward shaping and filtering); huggingface/trl#5697, #6263.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._drift import Drift
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS

KIND = "length_explosion"


@dataclass(kw_only=True)
class LengthExplosionConfig:
    """Settings of the length-explosion detector.

    Attributes:
        baseline_points: Measurements whose median is each signal's starting level.
        window: Recent measurements (their median, slope and noise).
        z: Standard errors of its own noise by which a trend must rise.
        max_length: The generation limit in tokens, when known; else inferred from the truncated responses.
        near_limit: Mean length / limit at or above which a rising length counts.
        truncated_warn: Truncated share at or above which a rising share counts.
        truncated_rise: Rise of the truncated share over its start that counts.
        critical_truncated: Truncated share that is critical (having started below half of it).
        patience: Consecutive qualifying measurements before a warning.
    """

    baseline_points: int = 10
    window: int = 20
    z: float = 3.0
    max_length: int | None = None
    near_limit: float = 0.7
    truncated_warn: float = 0.2
    truncated_rise: float = 0.15
    critical_truncated: float = 0.8
    patience: int = 5

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "baseline_points", "patience")
        require_ints(self, "window", minimum=3)
        require_positive(self, "z")
        if self.max_length is not None:
            require_ints(self, "max_length")
        for name in ("near_limit", "truncated_warn", "truncated_rise", "critical_truncated"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"LengthExplosionConfig.{name}={value!r}; allowed: a number in (0, 1]")


@DETECTORS.register("length_explosion")
class LengthExplosionDetector:
    """Flags response lengths racing to the generation limit.

    Add it to a Guard beside the defaults: ``Guard(..., detectors=[*default_detectors(), *policy_detectors()])``.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = LengthExplosionDetector(max_length=512)
        >>> found = []
        >>> for s in range(150):
        ...     length = min(512.0, 200.0 + 3.0 * max(0, s - 40)) + 4.0 * (-1) ** s
        ...     cut = min(1.0, max(0.0, (length - 400.0) / 112.0))
        ...     longest = min(512.0, length + 80)
        ...     values = {keys.RL_LENGTH_MEAN: length, keys.RL_TRUNCATED: cut, keys.RL_LENGTH_MAX: longest}
        ...     found += det.update(Observation(step=s, values=values))
        >>> [(f.step, f.severity) for f in found]
        [(107, 'warning'), (147, 'critical')]
    """

    name = "length_explosion"
    reads = (keys.RL_LENGTH_MEAN, keys.RL_TRUNCATED, keys.RL_LENGTH_MAX)
    rests_when_finite = False

    def __init__(self, config: LengthExplosionConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, LengthExplosionConfig, config, fields)
        self._length = Drift(self.config.baseline_points, self.config.window)
        self._cut = Drift(self.config.baseline_points, self.config.window)
        self._limit = 0.0  # the longest response seen in a step that had truncated ones
        self._episode = Episode()

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        length, cut = obs.values.get(keys.RL_LENGTH_MEAN), obs.values.get(keys.RL_TRUNCATED)
        if length is None and cut is None:
            return []
        longest = obs.values.get(keys.RL_LENGTH_MAX)
        if cut is not None and cut > 0 and longest is not None and math.isfinite(longest):
            self._limit = max(self._limit, longest)
        taken = [d.add(obs.step, v) for d, v in ((self._length, length), (self._cut, cut)) if v is not None]
        if not any(taken):
            return []
        limit = float(cfg.max_length) if cfg.max_length is not None else self._limit
        near = (
            self._length.known
            and limit > 0
            and self._length.level >= cfg.near_limit * limit
            and self._length.trend_z(1e-3 * limit) >= cfg.z
        )
        share, start = (self._cut.level, self._cut.start) if self._cut.known else (0.0, 0.0)
        rising_cut = (
            share >= cfg.truncated_warn and share - start >= cfg.truncated_rise and self._cut.trend_z(1e-3) >= cfg.z
        )
        critical = share >= cfg.critical_truncated and start < cfg.critical_truncated / 2
        if not (near or rising_cut or critical):
            if share < cfg.truncated_warn / 2 and not (limit > 0 and self._length.level >= cfg.near_limit * limit):
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        severity = self._episode.escalate(critical=critical, warning=self._episode.run >= cfg.patience)
        if severity is None:
            return []
        evidence: dict[str, Any] = {
            "length_start": round(self._length.start, 3) if self._length.known else None,
            "length_now": round(self._length.level, 3) if self._length.known else None,
            "limit": limit or None,
            "truncated_start": round(start, 4) if self._cut.known else None,
            "truncated_now": round(share, 4) if self._cut.known else None,
            "onset_step": self._episode.onset,
        }
        what = []
        if self._length.known:
            of_limit = f", {self._length.level / limit:.0%} of the {limit:g}-token limit" if limit > 0 else ""
            what.append(
                f"the mean response length went from {self._length.start:.4g} to {self._length.level:.4g}{of_limit}"
            )
        if self._cut.known:
            what.append(f"the truncated share from {start:.1%} to {share:.1%}")
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=keys.RL_TRUNCATED if self._cut.known else keys.RL_LENGTH_MEAN,
                value=share if self._cut.known else self._length.level,
                baseline=start if self._cut.known else self._length.start,
                evidence=evidence,
                text=" and ".join(what) + ".",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "length": self._length.state_dict(),
            "truncated": self._cut.state_dict(),
            "limit": self._limit,
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = LengthExplosionConfig(**state["config"])
        self._length.load_state_dict(state["length"])
        self._cut.load_state_dict(state["truncated"])
        self._limit = float(state["limit"])
        self._episode.load_state_dict(state)
