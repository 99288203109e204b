"""Non-finite detector: NaN or ±Inf in the loss, the gradients or the parameters, with the culprits named.

Always on, from the first step: it needs no baseline. The gradient check reads the global norm (non-finite
iff some gradient element is), then names the parameters whose own norm is non-finite. Under a
``torch.amp.GradScaler`` a non-finite gradient is the scaler's normal overflow signal; the scaler skips
that step itself, so it is reported as ``info`` (not double-counted) until it repeats ``max_overflows``
times in a row (DeepSpeed's min-scale guard exists for exactly that endless-skip loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints
from keel.detect.detector import DETECTORS

MAX_NAMED = 20  # parameters named in a finding; the count covers the rest


@dataclass(kw_only=True)
class NonFiniteConfig:
    """Settings of the non-finite detector.

    Attributes:
        max_overflows: Consecutive GradScaler overflows after which it is ``critical`` rather than ``info``.
    """

    max_overflows: int = 20

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "max_overflows")


@DETECTORS.register("non_finite")
class NonFiniteDetector:
    name = "non_finite"
    # `keel.detect.scan.ReadsKeys`: finite values only reset the overflow count; the per-parameter families and
    # the loss scale are read for a finding's evidence
    reads = (keys.LOSS, keys.GRAD_NORM, keys.PARAM_NORM)
    rests_when_finite = True

    def __init__(self, config: NonFiniteConfig | None = None) -> None:
        self.config = config_from(self, NonFiniteConfig, config, {})
        self._overflows = 0
        self._first = True  # no update was applied before the first observation: NaN parameters there came with them

    def update(self, obs: Observation) -> list[Finding]:
        first, self._first = self._first, False
        bad = [
            key
            for key in (keys.LOSS, keys.GRAD_NORM, keys.PARAM_NORM)
            if key in obs.values and not math.isfinite(obs.values[key])
        ]
        if not bad:
            self._overflows = 0
            return []
        evidence: dict[str, Any] = {"non_finite": bad}
        culprits = _non_finite_names(
            obs, keys.PARAM_NORM_PER_PARAM if keys.PARAM_NORM in bad else keys.GRAD_NORM_PER_PARAM
        )
        if culprits:
            evidence["parameters"] = culprits[:MAX_NAMED]
            evidence["count"] = len(culprits)
        # non-finite parameters are named first: a skip mends non-finite gradients, never parameters (the escalation
        # ladder rolls back on this signal), and they make the loss and every gradient non-finite too
        signal = keys.PARAM_NORM if keys.PARAM_NORM in bad else bad[0]
        value = obs.values[signal]
        scaler_overflow = keys.AMP_SCALE in obs.values and keys.PARAM_NORM not in bad
        if scaler_overflow:
            self._overflows += 1
            evidence.update(scale=obs.values[keys.AMP_SCALE], consecutive=self._overflows)
            if self._overflows < self.config.max_overflows:
                return [
                    Finding(
                        step=obs.step,
                        kind="loss_scale_overflow",
                        severity="info",
                        signal=signal,
                        value=value,
                        evidence=evidence,
                        cause="The GradScaler's scaled gradients overflowed; it skips this step and "
                        "halves the loss scale, as designed.",
                        advice="Nothing: mixed-precision loss scaling handles occasional overflows "
                        "(Micikevicius et al. 2018).",
                    )
                ]
        where = ", ".join(culprits[:5]) + (" …" if len(culprits) > 5 else "") if culprits else "unknown"
        if keys.PARAM_NORM in bad and first:
            cause = (
                f"Parameters hold NaN/Inf ({where}) before any update was applied: the model's initialisation or the "
                "checkpoint it was loaded from holds them."
            )
            advice = (
                "Check the initialisation (a std of 0 or inf, a division in an init function) and the checkpoint "
                "loaded; no snapshot older than the first step exists to roll back to."
            )
        elif keys.PARAM_NORM in bad:
            cause = f"Parameters hold NaN/Inf ({where}): an earlier update was applied with non-finite values."
            advice = "Roll back to the last finite snapshot (policy='recover') and lower the learning rate."
        elif scaler_overflow:
            cause = (
                f"The GradScaler has overflowed {self._overflows} steps in a row: the loss or gradients are "
                f"non-finite at any scale (first non-finite gradients: {where})."
            )
            advice = (
                "Find the producing module (a NaN in the forward pass, log of zero, division by zero); "
                "use bf16 instead of fp16, or lower the learning rate."
            )
        else:
            cause = f"Non-finite {' and '.join(bad)} (non-finite gradients in: {where})."
            advice = (
                "Skip this update (policy='skip'). If it repeats, lower the learning rate, check the data "
                "for bad values, prefer bf16 over fp16, and add QK-norm / z-loss where logits overflow."
            )
        return [
            Finding(
                step=obs.step,
                kind="non_finite",
                severity="critical",
                signal=signal,
                value=value,
                evidence=evidence,
                cause=cause,
                advice=advice,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"overflows": self._overflows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._overflows = int(state["overflows"])
        self._first = False  # a run in progress: its parameters come from its own updates


def _non_finite_names(obs: Observation, family: str) -> list[str]:
    names, values = obs.per_param.get(family, ((), []))
    return [name for name, value in zip(names, values, strict=True) if not math.isfinite(value)]
