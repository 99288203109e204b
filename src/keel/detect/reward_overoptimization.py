"""Reward-over-optimisation detector: the proxy reward still rising while an ensemble of reward models does not confirm
its gain, or while a held-out ("gold") reward falls.

Reads the proxy reward ``rl/reward_mean`` (else the ensemble mean ``rm/mean``), the ensemble's mean ``rm/mean`` and
disagreement ``rm/disagreement`` (`keel.signals.reward_ensemble_signals`) and/or ``rl/gold_reward`` (a reward the
policy is not trained on, when the loop has one). With none of the last three it stays silent: a rising reward alone
is what training is for.

Goodhart's law in RLHF (Gao et al. 2023; Coste et al. 2024): past some distance from the reference, the policy keeps
raising the proxy reward model's score while the true objective falls; what it gains on the proxy alone — its own
errors — the other members of an ensemble fit to the same preferences do not confirm. Rules, each over the last
``window`` measurements against the first ``baseline_points``, with trends judged in standard errors of each series'
own noise (``z``):

- unconfirmed gain: the proxy rising, and its lead over the ensemble's mean (proxy − ``rm/mean``) both above its
  start and still rising, each by ``z`` standard errors, and its growth beyond ``unconfirmed_share`` of the proxy's
  own rise by ``share_z`` standard errors → counts (it cannot speak when the proxy is the ensemble mean; it assumes
  the proxy is on the members' scale — one of them, or standardised as they are — since a proxy on a larger scale
  gains more than a faithful ensemble);
- proxy rising, and the gold reward falling (its window's slope, and its median below the best it has been, each by
  ``z`` standard errors) → counts; critical once the gold reward is below where the run started;
- with ``disagreement=True`` only: proxy rising, and the disagreement above its start and still rising by ``z``
  standard errors (its median at least ``rise_factor`` times its start) → counts.

Critical also when a counting rule holds with the disagreement at ``critical_factor`` times its start.
``patience`` consecutive measurements that count make a warning. Why these rules: on `keel bench rl`'s
over-optimisation scenario (GRPO on one of five standardised proxies) and its healthy control (GRPO on the gold
reward, the same ensemble logged), seeds 0-2 at LR 3e-4, 5e-4 and 1e-3, the unconfirmed gain warned before the gold
reward peaked in 8 of 9 runs (6 to 37 steps; the ninth at the peak) and was silent on the control at LR 2e-4 and
3e-4 (6 of 6). The share is judged in the gap's noise (``share_z``) because as a point estimate a healthy synthetic
series (the ensemble following 91 % of the proxy, hypothesis seed 12001) read 0.39 early in its run; the
disagreement rule warned at or after the peak in 3 of the 9 and on 7 of 9 controls, the gold reward rising
throughout: an ensemble disagrees more wherever the policy leaves the members' data, over-optimising or not.

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
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._drift import Drift
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS
from keel.detect.robust import median_standard_error

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
        unconfirmed_share: Least share of the proxy's gain since the start that the ensemble's mean does not
            follow (the proxy's lead over ``rm/mean`` grew by at least this share of the proxy's own rise) for the
            unconfirmed-gain rule to count.
        share_z: Standard errors of the gap's growth by which it must exceed ``unconfirmed_share`` of the proxy's
            rise (the share judged in the gap's noise, not as a point estimate).
        disagreement: Whether a rising disagreement alone counts (off by default: on `keel bench rl`'s runs the
            ensemble disagreed as much in runs trained on the gold reward itself; turn it on when the policy is
            trained on the ensemble mean, where the unconfirmed-gain rule cannot speak).
        patience: Consecutive qualifying measurements before a warning.
        noise_floor: Least noise assumed (reward units).
    """

    baseline_points: int = 10
    window: int = 30
    z: float = 3.0
    rise_factor: float = 1.3
    critical_factor: float = 4.0
    unconfirmed_share: float = 0.2
    share_z: float = 2.0
    disagreement: bool = False
    patience: int = 5
    noise_floor: float = 1e-6

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "baseline_points", "patience")
        require_ints(self, "window", minimum=3)
        require_positive(self, "z", "noise_floor", "unconfirmed_share", "share_z")
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
        [(125, 'warning', 'gold'), (163, 'critical', 'gold')]
    """

    name = "reward_overoptimization"
    reads = (*PROXY, keys.RM_DISAGREEMENT, keys.RL_GOLD_REWARD)
    rests_when_finite = False

    def __init__(self, config: RewardOverOptimizationConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, RewardOverOptimizationConfig, config, fields)
        points, window = self.config.baseline_points, self.config.window
        self._proxy_key = ""
        self._proxy, self._spread, self._gold = Drift(points, window), Drift(points, window), Drift(points, window)
        self._gap = Drift(points, window)  # the proxy's lead over the ensemble mean
        self._gold_best = -math.inf  # the best window median of the gold reward so far
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
        ensemble = obs.values.get(keys.RM_MEAN)
        if key != keys.RM_MEAN and ensemble is not None and math.isfinite(ensemble):
            self._gap.add(obs.step, proxy - ensemble)
        if not self._proxy.known or not (self._spread.known or self._gold.known or self._gap.known):
            return []
        floor = cfg.noise_floor
        proxy_up = self._proxy.trend_z(floor) >= cfg.z
        spread_ratio = self._spread.level / self._spread.start if self._spread.known and self._spread.start > 0 else 0
        spread_up = (
            cfg.disagreement
            and spread_ratio >= cfg.rise_factor
            and self._spread.change_z(floor) >= cfg.z
            and self._spread.trend_z(floor) >= cfg.z
        )
        share = self._unconfirmed_share()
        unconfirmed = (
            self._gap_beyond_share(floor) >= cfg.share_z
            and self._gap.change_z(floor) >= cfg.z
            and self._gap.trend_z(floor) >= cfg.z
        )
        gold_down = self._gold_falling()
        if not (proxy_up and (spread_up or unconfirmed or gold_down)):
            # the episode ends once the disagreement is back down, the ensemble follows the proxy again and the gold
            # reward no longer falls
            calm = (
                (not cfg.disagreement or spread_ratio < cfg.rise_factor)
                and share < cfg.unconfirmed_share
                and not (self._gold.known and self._gold.trend_z(floor) < 0)
            )
            if calm:
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        below_start = gold_down and self._gold.level < self._gold.start
        critical = ((spread_up or unconfirmed) and spread_ratio >= cfg.critical_factor) or below_start
        severity = self._episode.escalate(critical=critical, warning=self._episode.run >= cfg.patience)
        if severity is None:
            return []
        by = "gold" if gold_down else "unconfirmed" if unconfirmed else "disagreement"
        evidence: dict[str, Any] = {
            "by": by,
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
        if self._gap.known:
            evidence["unconfirmed_share"] = round(share, 6)
            if unconfirmed:
                parts.append(f"the ensemble's mean reward did not follow {share:.0%} of that gain")
        if self._gold.known:
            evidence.update(gold_start=round(self._gold.start, 6), gold_now=round(self._gold.level, 6))
            if gold_down:
                parts.append(
                    f"the gold reward is falling ({self._gold.start:.3g} at the start, {self._gold.level:.3g} now)"
                )
        signal, drift = {
            "gold": (keys.RL_GOLD_REWARD, self._gold),
            "unconfirmed": (keys.RM_MEAN, self._gap),
            "disagreement": (keys.RM_DISAGREEMENT, self._spread),
        }[by]
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
                signal=signal,
                value=drift.level,
                baseline=drift.start,
                evidence=evidence,
                text=text,
            )
        ]

    def _gold_falling(self) -> bool:
        """The gold reward's window falls by ``z`` standard errors and its median is below the best it has been by
        ``z`` standard errors of a median: a slope alone dipped by chance in 1 of 200 healthy synthetic series."""
        if not self._gold.known:
            return False
        z, floor = self.config.z, self.config.noise_floor
        self._gold_best = max(self._gold_best, self._gold.level)
        error = median_standard_error(self._gold.noise(floor), len(self._gold.values()))
        return self._gold.trend_z(floor) <= -z and self._gold_best - self._gold.level >= z * error

    def _gap_beyond_share(self, floor: float) -> float:
        """How far the proxy's lead over the ensemble mean grew beyond ``unconfirmed_share`` of the proxy's rise, in
        standard errors of that growth: the share is judged in the gap's noise, not as a point estimate (early in a
        run, with a small rise, a noisy gap made a healthy synthetic series — ensemble following 91 % — read 0.39)."""
        gain = self._proxy.level - self._proxy.start
        if not (self._gap.known and gain > 0):
            return 0.0
        excess = (self._gap.level - self._gap.start) - self.config.unconfirmed_share * gain
        return excess / self._gap.change_error(floor)

    def _unconfirmed_share(self) -> float:
        """How much of the proxy's rise since the start its lead over the ensemble mean grew by (0 when unknown)."""
        gain = self._proxy.level - self._proxy.start
        if not (self._gap.known and gain > 0):
            return 0.0
        return (self._gap.level - self._gap.start) / gain

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "proxy_key": self._proxy_key,
            "proxy": self._proxy.state_dict(),
            "disagreement": self._spread.state_dict(),
            "gold": self._gold.state_dict(),
            "gap": self._gap.state_dict(),
            "gold_best": self._gold_best if math.isfinite(self._gold_best) else None,
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = RewardOverOptimizationConfig(**state["config"])
        self._proxy_key = str(state["proxy_key"])
        self._proxy.load_state_dict(state["proxy"])
        self._spread.load_state_dict(state["disagreement"])
        self._gold.load_state_dict(state["gold"])
        self._gap.load_state_dict(state["gap"])
        self._gold_best = -math.inf if state["gold_best"] is None else float(state["gold_best"])
        self._episode.load_state_dict(state)
