"""Non-finite-origin detector: names the module where NaN or Inf was born, in the forward or the backward pass.

- **Forward**: the per-block ``act/max_abs/`` family of the `activation_rms` probe, in forward order. NaN and
  Inf propagate forward, so every block after the one where they were born is non-finite too; the first
  non-finite block is the origin.
- **Backward**: the loss and every activation are finite but some gradients are not (an overflow in a
  backward formula, e.g. ``exp`` near its limit). The gradient flows backwards, so every parameter *before*
  the birthplace in forward order gets a non-finite gradient and the ones after it do not: the origin is
  the module of the last parameter, in registration order, whose gradient norm (``grad/norm/``) is
  non-finite. When every gradient is non-finite, nothing inside the model is the birthplace: the NaN entered
  at the loss (its backward, or a scalar backpropagated other than the loss keel recorded) — with weights tied
  between embedding and head, "the last parameter" would otherwise name the final norm layer.

The finding is a ``warning``: it explains the ``non_finite`` critical finding of the same step, which is the
one a policy acts on (a skip confined to this step's gradients), rather than adding an alarm of its own.
Only the first step of an episode is judged: once a non-finite update has been applied, everything is
non-finite and "the first block" would say nothing. metaseq's ``NanDetector`` finds the same by
re-running the failed step with hooks on every module (metaseq/nan_detector.py); here it costs nothing
extra, at block resolution for the forward (name finer modules in the probe's ``modules`` for more).

References:
    metaseq ``metaseq/nan_detector.py``; HF ``transformers/debug_utils.py`` (``DebugUnderflowOverflow``).
"""

from __future__ import annotations

import math
from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel.detect.causes import cause_for
from keel.detect.detector import DETECTORS

ACTIVATIONS = keys.ACT_MAX_ABS_PER_BLOCK
_SUFFIXES = (".weight", ".bias")


def _module_of(param: str) -> str:
    for suffix in _SUFFIXES:
        if param.endswith(suffix):
            return param[: -len(suffix)]
    return param.rsplit(".", 1)[0] if "." in param else param


@DETECTORS.register("non_finite_origin")
class NonFiniteOriginDetector:
    """Names where the first NaN/Inf of an episode was born.

    Example:
        >>> from keel._core import Observation
        >>> obs = Observation(step=7, per_param={"act/max_abs/": (("blocks.0", "blocks.1", "blocks.2"),
        ...                                                        [3.0, float("inf"), float("nan")])})
        >>> [(f.step, f.evidence["module"], f.evidence["pass"]) for f in NonFiniteOriginDetector().update(obs)]
        [(7, 'blocks.1', 'forward')]
    """

    name = "non_finite_origin"
    reads = (
        ACTIVATIONS,
        keys.GRAD_NORM_PER_PARAM,
        keys.LOSS,
        keys.PARAM_NORM,
    )  # `keel.detect.scan.ReadsKeys`: finite ends an episode
    rests_when_finite = True

    def __init__(self) -> None:
        self._active = False

    def update(self, obs: Observation) -> list[Finding]:
        act_names, act_values = obs.per_param.get(ACTIVATIONS, ((), []))
        bad_act = [n for n, v in zip(act_names, act_values, strict=True) if not math.isfinite(v)]
        grad_names, grad_values = obs.per_param.get(keys.GRAD_NORM_PER_PARAM, ((), []))
        bad_grad = [n for n, v in zip(grad_names, grad_values, strict=True) if not math.isfinite(v)]
        loss = obs.values.get(keys.LOSS, 0.0)
        if not bad_act and not bad_grad and math.isfinite(loss):
            self._active = False
            return []
        if self._active:
            return []
        self._active = True
        if not math.isfinite(obs.values.get(keys.PARAM_NORM, 0.0)):
            return []  # a parameter holds it: the non_finite finding names the parameters, no pass is its birthplace
        if bad_act:
            origin, where = bad_act[0], "forward"
            before = list(act_names[: act_names.index(origin)])
            value = act_values[act_names.index(origin)]
            text = (
                f"NaN/Inf was born in the forward pass of {origin}: its output is the first non-finite one "
                f"({len(before)} block(s) before it were finite)."
            )
        elif bad_grad and len(bad_grad) == len(grad_names) and math.isfinite(loss):
            origin, where, before, value = "loss", "backward", [], grad_values[-1]
            text = (
                "NaN/Inf entered at the output end of the backward pass: every parameter's gradient is non-finite "
                "while the loss keel recorded and the activations are finite, so no module inside the model is "
                "its birthplace — the loss function's backward overflowed, or the scalar the loop called "
                "backward() on is not the loss keel recorded (a NaN added after it)."
            )
        elif bad_grad and math.isfinite(loss):
            last = bad_grad[-1]
            origin, where = _module_of(last), "backward"
            after = [n for n in grad_names[grad_names.index(last) + 1 :]]
            before, value = after, grad_values[grad_names.index(last)]
            text = (
                f"NaN/Inf was born in the backward pass of {origin}: the loss and the activations are finite, "
                f"{last} is the last parameter in forward order with a non-finite gradient "
                f"({len(after)} later parameter(s) have finite ones)."
            )
        else:
            return []  # a non-finite loss with nothing else measured: the non_finite detector covers it
        cause = cause_for("non_finite")
        evidence: dict[str, Any] = {
            "module": origin,
            "pass": where,
            "finite_after" if where == "backward" else "finite_before": before[:20],
            "non_finite": (bad_act or bad_grad)[:20],
        }
        if cause is not None:
            evidence["advice"] = cause.advice_dicts()
        # Under a GradScaler, non-finite gradients are the scaler's routine overflow signal: worth knowing, no alarm.
        severity: Severity = "info" if keys.AMP_SCALE in obs.values else "warning"
        return [
            Finding(
                step=obs.step,
                kind="non_finite_origin",
                severity=severity,
                signal=origin,
                value=value,
                evidence=evidence,
                cause=text,
                advice=(
                    "Check the loss function and what the loop does to the loss before backward(); "
                    if origin == "loss"
                    else f"Look inside {origin} for an overflow (exp, x², division, log of 0) in the working "
                    "precision; "
                )
                + (cause.advice_text() if cause else ""),
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"active": self._active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._active = bool(state["active"])
