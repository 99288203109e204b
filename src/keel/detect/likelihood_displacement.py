"""Likelihood-displacement detector: the chosen response's log-probability falling while the DPO margin rises.

Reads the chosen response's log-probability — ``pref/chosen_displacement`` (log π(y⁺|x) − log π_ref(y⁺|x), 0 with a
fresh reference), else ``pref/chosen_reward`` (β times the same log-ratio summed over the response: TRL's
``rewards/chosen``), else ``pref/chosen_logp_token``, else ``pref/chosen_logp``, the first one the run logs — and
``pref/margin`` (`keel.signals.preference_signals`, or TRL's ``rewards/chosen`` and ``rewards/margins``). Without a
margin (no reference model) it stays silent.

The preference objective only widens the gap between chosen and rejected; Razin et al. show it can do so by pushing
both down, moving probability mass from the preferred response to others (in their runs, to responses the rejected
one was meant to suppress). The rule: the chosen signal's recent median is below its starting level by ``z`` standard
errors of its own noise and by ``min_drop`` at least, it is not rising back, and the margin is ``z`` standard errors
above its own start and still rising — for ``patience`` measurements: a warning. Critical when the per-token chosen
log-probability (``pref/chosen_logp_token`` logged, so the displacement is per token too) has fallen ``critical_drop``
nats: each chosen token is then e^critical_drop times less likely than at the start. A summed per-sequence signal
alone gives warnings only: its size depends on response length.

References:
    Razin et al. 2025, "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization", ICLR,
    arXiv 2410.08847; code github.com/princeton-nlp/unintentional-unalignment. Discussion in huggingface/trl#800 and
    eric-mitchell/direct-preference-optimization#32.
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

KIND = "likelihood_displacement"
# First logged wins. The log-ratios to the reference come first: the same batch's reference cancels most of the
# batch-to-batch spread of a summed log-probability (under TRL, rewards/chosen is far quieter than logps/chosen).
CHOSEN = (
    keys.PREF_CHOSEN_DISPLACEMENT,
    keys.PREF_CHOSEN_REWARD,
    keys.PREF_CHOSEN_LOGP_TOKEN,
    keys.PREF_CHOSEN_LOGP,
)


@dataclass(kw_only=True)
class LikelihoodDisplacementConfig:
    """Settings of the likelihood-displacement detector.

    Attributes:
        baseline_points: Measurements whose median is each signal's starting level.
        window: Recent measurements (their median, slope and noise).
        z: Standard errors of its own noise by which a signal must have moved (and the margin be rising).
        min_drop: Least fall of the chosen signal that counts, in its units (nats).
        critical_drop: Fall of the per-token chosen log-probability (nats per token) that is critical.
        patience: Consecutive qualifying measurements before a warning.
        noise_floor: Least noise assumed (nats): a signal that is exactly constant has none.
    """

    baseline_points: int = 5
    window: int = 20
    z: float = 4.0
    min_drop: float = 0.05
    critical_drop: float = 1.0
    patience: int = 5
    noise_floor: float = 1e-4

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "baseline_points", "patience")
        require_ints(self, "window", minimum=3)
        require_positive(self, "z", "min_drop", "critical_drop", "noise_floor")


@DETECTORS.register("likelihood_displacement")
class LikelihoodDisplacementDetector:
    """Flags DPO runs whose chosen log-probability falls while the margin grows.

    Add it to a Guard beside the defaults: ``Guard(..., detectors=[*default_detectors(), *preference_detectors()])``.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = LikelihoodDisplacementDetector()
        >>> found = []
        >>> for s in range(120):
        ...     chosen = -0.02 * max(0, s - 30) + 0.01 * (-1) ** s  # per-token displacement, falling from step 30
        ...     values = {keys.PREF_CHOSEN_DISPLACEMENT: chosen, keys.PREF_MARGIN: 0.02 * s + 0.01 * (-1) ** s}
        ...     found += det.update(Observation(step=s, values=values))
        >>> [(f.kind, f.severity, f.step) for f in found]
        [('likelihood_displacement', 'warning', 46)]
    """

    name = "likelihood_displacement"
    reads = (*CHOSEN, keys.PREF_MARGIN)
    rests_when_finite = False

    def __init__(self, config: LikelihoodDisplacementConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, LikelihoodDisplacementConfig, config, fields)
        self._signal = ""  # the chosen key this run logs, fixed at its first measurement
        self._chosen = Drift(self.config.baseline_points, self.config.window)
        self._margin = Drift(self.config.baseline_points, self.config.window)
        self._episode = Episode()

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        signal = self._signal or next((k for k in CHOSEN if k in obs.values), "")
        chosen, margin = obs.values.get(signal), obs.values.get(keys.PREF_MARGIN)
        if chosen is None or margin is None or not (math.isfinite(chosen) and math.isfinite(margin)):
            return []  # a NaN reward is the non-finite detectors' matter; it never enters a baseline
        self._signal = signal
        self._chosen.add(obs.step, chosen)
        self._margin.add(obs.step, margin)
        if not (self._chosen.known and self._margin.known):
            return []
        floor = cfg.noise_floor
        drop = self._chosen.start - self._chosen.level
        chosen_z = self._chosen.change_z(floor)
        displaced = drop >= cfg.min_drop and chosen_z <= -cfg.z and self._chosen.slope() <= 0
        margin_up = self._margin.change_z(floor) >= cfg.z and self._margin.slope() > 0
        if not (displaced and margin_up):
            if drop <= 0 or chosen_z > -1:  # back at its start: a later fall is a new episode
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        per_token = signal == keys.PREF_CHOSEN_LOGP_TOKEN or (
            signal == keys.PREF_CHOSEN_DISPLACEMENT and keys.PREF_CHOSEN_LOGP_TOKEN in obs.values
        )
        severity = self._episode.escalate(
            critical=per_token and drop >= cfg.critical_drop, warning=self._episode.run >= cfg.patience
        )
        if severity is None:
            return []
        slope = self._chosen.slope()
        evidence: dict[str, Any] = {
            "chosen_signal": signal,
            "chosen_start": round(self._chosen.start, 6),
            "chosen_now": round(self._chosen.level, 6),
            "drop": round(drop, 6),
            "drop_z": round(-chosen_z, 2),
            "chosen_slope_per_step": round(slope, 8),
            "margin_start": round(self._margin.start, 6),
            "margin_now": round(self._margin.level, 6),
            "per_token": per_token,
            "onset_step": self._episode.onset,
        }
        if per_token and drop < cfg.critical_drop and slope < 0:
            project(evidence, obs.step, (cfg.critical_drop - drop) / -slope)
        unit = " per token" if per_token else ""
        text = (
            f"the chosen responses' log-probability ({signal}) fell {drop:.3g} nats{unit} below its start while the "
            f"preference margin rose from {self._margin.start:.3g} to {self._margin.level:.3g}."
        )
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=signal,
                value=chosen,
                baseline=self._chosen.start,
                evidence=evidence,
                text=text,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "signal": self._signal,
            "chosen": self._chosen.state_dict(),
            "margin": self._margin.state_dict(),
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = LikelihoodDisplacementConfig(**state["config"])
        self._signal = str(state["signal"])
        self._chosen.load_state_dict(state["chosen"])
        self._margin.load_state_dict(state["margin"])
        self._episode.load_state_dict(state)
