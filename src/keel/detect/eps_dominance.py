"""ε-dominance detector: Adam's ε, not the gradient, sets most of the update's denominator and the update shrinks.

Reads ``adam/eps_dominated`` (the share of Adam's live moment elements with √v̂ < ε) and ``adam/update_rms`` (the
RMS of the unscaled update m̂ / (√v̂ + ε)), both from the Adam ε probe (`keel.signals.AdamEpsProbe`, in
``probes="full"``); silent while they are absent. Wortsman et al. (2023, §3.4) track the update RMS (about 0.2–1
when the gradient sets it) and watch it collapse as the gradient's RMS falls to ε; their fix is a smaller ε (1e-15).

The paper gives no threshold, so the rule is keel's, chosen from measurements on the tiny proxy (lr 3e-3, 300
steps, seed 0, every 20 steps): a healthy run has no ε-dominated element at all and an update RMS of 0.15–0.36;
with every gradient scaled by 1e-5, 45–73 % of the elements are ε-dominated and the RMS is 0.08–0.23 (the loss
trains a little slower); scaled by 1e-6, 99 % and 0.034–0.099 (val loss 2.63 against 2.36). For gradients that
are pure noise the RMS is about √((1−β₁)/(1+β₁)) = 0.23 at β₁ = 0.9; signal only raises it. A measurement
qualifies when at least ``min_fraction`` (half) of the elements are ε-dominated *and* the update RMS is at most
``max_update_rms`` (0.1, under half that noise floor): either alone is not the symptom (a few dormant embedding
rows; an update that is small for another reason).
A warning after ``patience`` qualifying measurements in a row; critical when the share reaches
``critical_fraction``.

References:
    Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities",
    arXiv 2309.14322 (no official code). Everett et al. 2024, "Scaling Exponents Across Parameterizations and
    Optimizers", arXiv 2407.05872 (the same ε underflow; Adam-atan2).
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

KIND = "eps_dominance"
MAX_NAMED = 5  # most ε-dominated parameters named in a finding


@dataclass(kw_only=True)
class EpsDominanceConfig:
    """Settings of the ε-dominance detector.

    Attributes:
        min_fraction: Share of Adam's live elements with √v̂ < ε at or above which a measurement qualifies.
        max_update_rms: Update RMS at or below which a measurement qualifies.
        critical_fraction: Share that is critical (with the update RMS qualifying too).
        patience: Qualifying measurements in a row before a warning (the probe measures every 50 steps).
    """

    min_fraction: float = 0.5
    max_update_rms: float = 0.1
    critical_fraction: float = 0.9
    patience: int = 2

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "patience")
        if not 0 < self.min_fraction <= self.critical_fraction <= 1:
            raise ValueError(
                f"EpsDominanceConfig.min_fraction={self.min_fraction!r}, critical_fraction={self.critical_fraction!r}; "
                "allowed: 0 < min_fraction <= critical_fraction <= 1"
            )
        if not 0 < self.max_update_rms < math.inf:
            raise ValueError(f"EpsDominanceConfig.max_update_rms={self.max_update_rms!r}; allowed: a finite number > 0")


@DETECTORS.register("eps_dominance")
class EpsDominanceDetector:
    """Flags Adam updates that ε, not the gradient, has shrunk.

    Not in `default_detectors`, as its probe is not in the default probes: add both,
    ``Guard(model, opt, probes="full", detectors=[*default_detectors(), EpsDominanceDetector()])``.

    Example:
        >>> from keel._core import Observation, keys
        >>> det, found = EpsDominanceDetector(), []
        >>> for s in range(0, 500, 50):  # the probe's cadence; ε takes over from step 200
        ...     dominated, rms = (0.95, 0.004) if s >= 200 else (0.0, 0.25)
        ...     found += det.update(Observation(step=s, values={keys.ADAM_EPS_DOMINATED: dominated,
        ...                                                     keys.ADAM_UPDATE_RMS: rms}))
        >>> [(f.step, f.severity) for f in found]
        [(250, 'critical')]
    """

    name = "eps_dominance"
    reads = (keys.ADAM_EPS_DOMINATED, keys.ADAM_UPDATE_RMS, keys.ADAM_EPS_DOMINATED_PER_PARAM)
    rests_when_finite = False

    def __init__(self, config: EpsDominanceConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, EpsDominanceConfig, config, fields)
        self._healthy_rms: float | None = None  # the update RMS of the last measurement that did not qualify
        self._episode = Episode()

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        share, rms = obs.values.get(keys.ADAM_EPS_DOMINATED), obs.values.get(keys.ADAM_UPDATE_RMS)
        if share is None or rms is None or not (math.isfinite(share) and math.isfinite(rms)):
            return []
        if share < cfg.min_fraction or rms > cfg.max_update_rms:
            self._healthy_rms = rms
            if share < cfg.min_fraction / 2:
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        severity = self._episode.escalate(
            critical=share >= cfg.critical_fraction and self._episode.run >= cfg.patience,
            warning=self._episode.run >= cfg.patience,
        )
        if severity is None:
            return []
        evidence: dict[str, Any] = {
            "eps_dominated": round(share, 4),
            "update_rms": rms,
            "onset_step": self._episode.onset,
        }
        if self._healthy_rms is not None:
            evidence["update_rms_before"] = self._healthy_rms
        names, values = obs.per_param.get(keys.ADAM_EPS_DOMINATED_PER_PARAM, ((), []))
        worst = sorted((v, n) for n, v in zip(names, values, strict=True) if math.isfinite(v))[::-1][:MAX_NAMED]
        if worst:
            evidence["parameters"] = {n: round(v, 4) for v, n in worst}
        text = (
            f"{share:.0%} of Adam's moment elements have √v̂ below ε and the update RMS is {rms:.3g} "
            f"(about 0.2–1 when the gradient sets it)."
        )
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=keys.ADAM_EPS_DOMINATED,
                value=share,
                baseline=math.nan if self._healthy_rms is None else self._healthy_rms,
                evidence=evidence,
                text=text,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "healthy_rms": self._healthy_rms, **self._episode.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = EpsDominanceConfig(**state["config"])
        rms = state["healthy_rms"]
        self._healthy_rms = None if rms is None else float(rms)
        self._episode.load_state_dict(state)
