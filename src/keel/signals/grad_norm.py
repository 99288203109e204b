"""Gradient-norm probe: the global gradient norm, and each parameter's, which also name non-finite ones.

| key                 | cadence                          | cost                                                      |
|---------------------|----------------------------------|-----------------------------------------------------------|
| `grad/norm`         | every step                       | one fused read of all gradients (``torch._foreach_norm``) |
| `grad/norm/<param>` | every step on device (see below) | one float per parameter tensor in the packed copy         |

`grad/norm/<param>` is stored on `log_every` steps and whenever the global norm is non-finite.

The global norm is computed from the per-parameter norms, the way ``clip_grad_norm_`` does, so the
per-parameter values come for free. A non-finite global norm means some gradient holds NaN or ±Inf; the
per-parameter values say which.
"""

from __future__ import annotations

from keel._core import keys
from keel.signals.norms import global_norm, per_tensor_norms
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES


@PROBES.register("grad_norm")
class GradNormProbe:
    name = "grad_norm"

    def measure(self, ctx: StepContext) -> Measurements:
        norms = per_tensor_norms(ctx.grads)
        return {keys.GRAD_NORM: global_norm(norms), keys.GRAD_NORM_PER_PARAM: PerParam(ctx.names, norms)}

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
