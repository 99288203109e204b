"""Dead-groups detector: nearly every prompt group has rewards that are all equal, so its advantages are all zero.

Reads ``rl/zero_std_groups`` (`keel.signals.policy_signals` with ``group_size``, or TRL's ``frac_reward_zero_std``),
and ``rl/truncated`` when logged; silent without the first. GRPO's advantage is (r − group mean)/(group std + ε): a
group whose responses all got the same reward — all right, all wrong — teaches nothing, and when nearly every group
is like that the loss and gradient are zero and the run only burns compute (huggingface/trl#3857). DAPO's dynamic
sampling resamples such groups. Healthy runs with binary rewards have many uniform groups (easy and hard prompts);
the alarm is for nearly all of them.

The level is the median of the last ``window`` measurements (no warm-up: a run can be dead from its first step). A
warning when it has been at or above ``warn_level`` for ``patience`` measurements; critical when every group has
been uniform (``critical_level``) for ``critical_patience`` measurements — the run has not learned for that long, and
a rollback cannot change that. When the truncated share is also at or above ``starvation_truncated`` the finding is
``truncation_starvation``: responses cut at ``max_completion_length`` all score the same (huggingface/trl#5697,
#6263: 97–99 % truncated at 256 tokens, reward 0, loss 0) — unless ``rl/reward_mean`` has risen above its first
``MIN_POINTS`` values: groups uniform at a risen reward are solved, not starved (TRL's own ``grpo.py`` at an 8-token
limit: reward 0.125 → 1.0, every response cut), and a longer limit would not revive them.

References:
    Yu et al. 2025, DAPO, arXiv 2503.14476 (dynamic sampling, overlong shaping). huggingface/trl#3857, #5697, #6263.
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
from keel.detect.trend import TrendWindow

KIND = "dead_groups"
STARVATION = "truncation_starvation"
MIN_POINTS = 5  # measurements before the window's median is judged


@dataclass(kw_only=True)
class DeadGroupsConfig:
    """Settings of the dead-groups detector.

    Attributes:
        window: Recent measurements: their median is the level.
        warn_level: Share of uniform groups at or above which it counts.
        critical_level: Share that, held for ``critical_patience`` measurements, is critical.
        patience: Consecutive qualifying measurements before a warning.
        critical_patience: Consecutive measurements at ``critical_level`` before critical.
        starvation_truncated: Truncated share (median of the window) at or above which dead groups are named
            truncation starvation.
    """

    window: int = 10
    warn_level: float = 0.9
    critical_level: float = 1.0
    patience: int = 5
    critical_patience: int = 20
    starvation_truncated: float = 0.9

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "window", "patience", "critical_patience")
        if not 0 < self.warn_level <= self.critical_level <= 1 or not 0 < self.starvation_truncated <= 1:
            raise ValueError(
                f"DeadGroupsConfig.warn_level={self.warn_level!r}, critical_level={self.critical_level!r}, "
                f"starvation_truncated={self.starvation_truncated!r}; allowed: 0 < warn_level <= critical_level <= 1, "
                "starvation_truncated in (0, 1]"
            )


@DETECTORS.register("dead_groups")
class DeadGroupsDetector:
    """Flags GRPO batches in which nearly every group's rewards are equal (zero advantage, no gradient).

    Add it to a Guard beside the defaults: ``Guard(..., detectors=[*default_detectors(), *policy_detectors()])``.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = DeadGroupsDetector()
        >>> found = []
        >>> for s in range(40):
        ...     values = {keys.RL_ZERO_STD_GROUPS: 1.0, keys.RL_TRUNCATED: 0.98}  # trl#5697: all cut, all 0
        ...     found += det.update(Observation(step=s, values=values))
        >>> [(f.step, f.kind, f.severity) for f in found]
        [(8, 'truncation_starvation', 'warning'), (23, 'truncation_starvation', 'critical')]
    """

    name = "dead_groups"
    reads = (keys.RL_ZERO_STD_GROUPS, keys.RL_TRUNCATED, keys.RL_REWARD_MEAN)
    rests_when_finite = False

    def __init__(self, config: DeadGroupsConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, DeadGroupsConfig, config, fields)
        self._dead = TrendWindow(self.config.window)
        self._cut = TrendWindow(self.config.window)
        self._reward = TrendWindow(self.config.window)
        self._reward_start: list[float] = []  # the first MIN_POINTS reward means
        self._episode = Episode()
        self._at_critical = 0  # consecutive measurements with the level at critical_level

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(keys.RL_ZERO_STD_GROUPS)
        cut = obs.values.get(keys.RL_TRUNCATED)
        if cut is not None:
            self._cut.add(obs.step, cut)
        reward = obs.values.get(keys.RL_REWARD_MEAN)
        if reward is not None and self._reward.add(obs.step, reward) and len(self._reward_start) < MIN_POINTS:
            self._reward_start.append(reward)
        if x is None or not self._dead.add(obs.step, x) or len(self._dead.points) < MIN_POINTS:
            return []
        level = self._dead.median()
        if level < cfg.warn_level:
            self._at_critical = 0
            if level < cfg.warn_level - 0.1:  # hysteresis: a level hovering at the threshold is one episode
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=self._dead.first_step())
        self._at_critical = self._at_critical + 1 if level >= cfg.critical_level else 0
        severity = self._episode.escalate(
            critical=self._at_critical >= cfg.critical_patience, warning=self._episode.run >= cfg.patience
        )
        if severity is None:
            return []
        truncated = self._cut.median() if self._cut.points else math.nan
        risen = bool(self._reward_start) and self._reward.median() > max(self._reward_start)
        starving = truncated >= cfg.starvation_truncated and not risen
        evidence: dict[str, Any] = {
            "zero_std_groups": round(level, 4),
            "truncated": round(truncated, 4) if math.isfinite(truncated) else None,
            "consecutive": self._episode.run,
            "onset_step": self._episode.onset,
        }
        if risen:
            evidence.update(reward_start=round(max(self._reward_start), 4), reward=round(self._reward.median(), 4))
        text = (
            f"{level:.0%} of the prompt groups got equal rewards for every response (zero advantage, no gradient)"
            + (f", and {truncated:.0%} of the responses were cut at the length limit." if starving else ".")
        )
        return [
            explained_finding(
                step=obs.step,
                kind=STARVATION if starving else KIND,
                severity=severity,
                signal=keys.RL_ZERO_STD_GROUPS,
                value=level,
                baseline=cfg.warn_level,
                evidence=evidence,
                text=text,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "dead": self._dead.state_dict(),
            "truncated": self._cut.state_dict(),
            "at_critical": self._at_critical,
            "reward": self._reward.state_dict(),
            "reward_start": list(self._reward_start),
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = DeadGroupsConfig(**state["config"])
        self._dead.load_state_dict(state["dead"])
        self._cut.load_state_dict(state["truncated"])
        self._at_critical = int(state["at_critical"])
        if "reward" in state:  # states saved before the reward was read have none
            self._reward.load_state_dict(state["reward"])
            self._reward_start = [float(v) for v in state["reward_start"]]
        self._episode.load_state_dict(state)
