"""Parameter-norm probe: the norm of all trainable parameters, and of each one.

| key                  | cadence          | cost                                       |
|----------------------|------------------|--------------------------------------------|
| `param/norm`         | `log_every` steps | one fused read of all trainable parameters |
| `param/norm/<param>` | `log_every` steps | one float per parameter tensor             |

Slow growth of the parameter norm is the backdrop of attention- and output-logit growth (Wortsman et al.
2023, arXiv 2309.14322); weight decay is what holds it.
"""

from __future__ import annotations

from keel._core import keys
from keel.signals.norms import global_norm, per_tensor_norms
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES


@PROBES.register("param_norm")
class ParamNormProbe:
    name = "param_norm"

    def measure(self, ctx: StepContext) -> Measurements:
        if not ctx.log_step:
            return {}
        norms = per_tensor_norms([p.detach() for p in ctx.params])
        return {keys.PARAM_NORM: global_norm(norms), keys.PARAM_NORM_PER_PARAM: PerParam(ctx.names, norms)}

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
