"""Reward-over-optimisation detector: the proxy reward still rising while the reward models disagree more, or while a
held-out ("gold") reward falls.

Reads the proxy reward ``rl/reward_mean`` (else the ensemble mean ``rm/mean``), and ``rm/disagreement``
(`keel.signals.reward_ensemble_signals`) and/or ``rl/gold_reward`` (a reward the policy is not trained on, when the
loop has one). With neither of the last two it stays silent: a rising reward alone is what training is for.

Goodhart's law in RLHF (Gao et al. 2023; Coste et al. 2024): past some distance from the reference, the policy keeps
raising the proxy reward model's score while the true objective falls. An ensemble of reward models that differ only
in their seed disagrees more and more on those responses — Coste et al. use that spread to penalise them (UWO) — so
its rise is a warning before the gold reward turns. Rules, each over the last ``window`` measurements against the
first ``baseline_points``, with trends judged in standard errors of each series' own noise (``z``):

- proxy rising, and the disagreement both above its start and still rising, each by ``z`` standard errors of its
  own noise (and its median at least ``rise_factor`` times its start) → counts; critical at ``critical_factor`` times;
- proxy rising, and the gold reward falling → counts; critical once the gold reward is below where the run started.

``patience`` consecutive measurements that count make a warning. The disagreement rule is judged in the series' own
noise, not as a ratio: on `keel bench rl`'s over-optimisation run the disagreement rises steadily from well before the
gold reward peaks but reaches twice its start only after it (a ×2 rule warned 19 steps after the peak), while a run
trained on the gold reward itself, ensemble logged, kept its disagreement flat. ``rise_factor`` (1.3) only keeps a
very smooth but negligible drift from counting.

References:
    Coste et al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization", ICLR, arXiv 2310.02743; code
    github.com/tlc4418/llm_optimization. Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization", ICML,
    arXiv 2210.10760.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, require_ints, require_positive
from keel.detect._drift import Drift
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS

KIND = "reward_overoptimization"
PROXY = (keys.RL_REWARD_MEAN, keys.RM_MEAN)  # the first one logged is the proxy


@dataclass(kw_only=True)
class RewardOverOptimizationConfig:
    """Settings of the reward-over-optimisation detector.

    Attributes:
        baseline_points: Measurements whose median is each signal's starting level.
        window: Recent measurements (their median, slope and noise).
        z: Standard errors of its own noise by which a trend must rise or fall.
        rise_factor: Least disagreement / its start at which a significant rise counts (a floor on the effect size;
            significance is ``z``).
        critical_factor: Disagreement / its start that is critical.
        patience: Consecutive qualifying measurements before a warning.
        noise_floor: Least noise assumed (reward units).
    """

    baseline_points: int = 10
    window: int = 30
    z: float = 3.0
    rise_factor: float = 1.3
    critical_factor: float = 4.0
    patience: int = 5
    noise_floor: float = 1e-6

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "baseline_points", "patience")
        require_ints(self, "window", minimum=3)
        require_positive(self, "z", "noise_floor")
        if not 1 < self.rise_factor <= self.critical_factor:
            raise ValueError(
                f"RewardOverOptimizationConfig.rise_factor={self.rise_factor!r}, critical_factor="
                f"{self.critical_factor!r}; allowed: 1 < rise_factor <= critical_factor"
            )


@DETECTORS.register("reward_overoptimization")
class RewardOverOptimizationDetector:
    """Flags a proxy reward that keeps rising while the ensemble disagrees more or the gold reward falls.

    Add it to a Guard beside the defaults: ``Guard(..., detectors=[*default_detectors(), *policy_detectors()])``.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = RewardOverOptimizationDetector()
        >>> found = []
        >>> for s in range(200):
        ...     wobble = 0.01 * (-1) ** s
        ...     gold = 0.01 * min(s, 100) - 0.02 * max(0, s - 100) + wobble  # peaks at step 100, then falls
        ...     values = {keys.RL_REWARD_MEAN: 0.02 * s + wobble, keys.RL_GOLD_REWARD: gold}
        ...     found += det.update(Observation(step=s, values=values))
        >>> [(f.step, f.severity, f.evidence["by"]) for f in found]
        [(117, 'warning', 'gold'), (163, 'critical', 'gold')]
    """

    name = "reward_overoptimization"
    reads = (*PROXY, keys.RM_DISAGREEMENT, keys.RL_GOLD_REWARD)
    rests_when_finite = False

    def __init__(self, config: RewardOverOptimizationConfig | None = None, **fields: object) -> None:
        self.config = config or RewardOverOptimizationConfig(**fields)  # type: ignore[arg-type]
        points, window = self.config.baseline_points, self.config.window
        self._proxy_key = ""
        self._proxy, self._spread, self._gold = Drift(points, window), Drift(points, window), Drift(points, window)
        self._episode = Episode()

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        key = self._proxy_key or next((k for k in PROXY if k in obs.values), "")
        proxy = obs.values.get(key)
        if proxy is None or not math.isfinite(proxy):
            return []
        self._proxy_key = key
        self._proxy.add(obs.step, proxy)
        for drift, k in ((self._spread, keys.RM_DISAGREEMENT), (self._gold, keys.RL_GOLD_REWARD)):
            value = obs.values.get(k)
            if value is not None:
                drift.add(obs.step, value)
        if not self._proxy.known or not (self._spread.known or self._gold.known):
            return []
        floor = cfg.noise_floor
        proxy_up = self._proxy.trend_z(floor) >= cfg.z
        spread_ratio = self._spread.level / self._spread.start if self._spread.known and self._spread.start > 0 else 0
        spread_up = (
            spread_ratio >= cfg.rise_factor
            and self._spread.change_z(floor) >= cfg.z
            and self._spread.trend_z(floor) >= cfg.z
        )
        gold_down = self._gold.known and self._gold.trend_z(floor) <= -cfg.z
        if not (proxy_up and (spread_up or gold_down)):
            # the episode ends once the disagreement is back down and the gold reward no longer falls
            calm = spread_ratio < cfg.rise_factor and not (self._gold.known and self._gold.trend_z(floor) < 0)
            if calm:
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        below_start = gold_down and self._gold.level < self._gold.start
        critical = (spread_up and spread_ratio >= cfg.critical_factor) or below_start
        severity = self._episode.escalate(critical=critical, warning=self._episode.run >= cfg.patience)
        if severity is None:
            return []
        evidence: dict[str, Any] = {
            "by": "gold" if gold_down else "disagreement",
            "proxy_signal": key,
            "proxy_start": round(self._proxy.start, 6),
            "proxy_now": round(self._proxy.level, 6),
            "onset_step": self._episode.onset,
        }
        parts = []
        if self._spread.known:
            evidence.update(
                disagreement_start=round(self._spread.start, 6), disagreement_now=round(self._spread.level, 6)
            )
            if spread_up:
                parts.append(f"the reward models' disagreement grew to {spread_ratio:.3g}× its start")
        if self._gold.known:
            evidence.update(gold_start=round(self._gold.start, 6), gold_now=round(self._gold.level, 6))
            if gold_down:
                parts.append(
                    f"the gold reward is falling ({self._gold.start:.3g} at the start, {self._gold.level:.3g} now)"
                )
        text = (
            f"the proxy reward rose from {self._proxy.start:.3g} to {self._proxy.level:.3g} while "
            + " and ".join(parts)
            + "."
        )
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=keys.RL_GOLD_REWARD if gold_down else keys.RM_DISAGREEMENT,
                value=self._gold.level if gold_down else self._spread.level,
                baseline=self._gold.start if gold_down else self._spread.start,
                evidence=evidence,
                text=text,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "proxy_key": self._proxy_key,
            "proxy": self._proxy.state_dict(),
            "disagreement": self._spread.state_dict(),
            "gold": self._gold.state_dict(),
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = RewardOverOptimizationConfig(**state["config"])
        self._proxy_key = str(state["proxy_key"])
        self._proxy.load_state_dict(state["proxy"])
        self._spread.load_state_dict(state["disagreement"])
        self._gold.load_state_dict(state["gold"])
        self._episode.load_state_dict(state)
