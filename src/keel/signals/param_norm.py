"""Parameter-norm probe: the norm of all trainable parameters, and of each one.

| key                  | cadence          | cost                                       |
|----------------------|------------------|--------------------------------------------|
| `param/norm`         | `log_every` steps | one fused read of all trainable parameters |
| `param/norm/<param>` | `log_every` steps | one float per parameter tensor             |

Slow growth of the parameter norm is the backdrop of attention- and output-logit growth (Wortsman et al.
2023, arXiv 2309.14322); weight decay is what holds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from keel._core import keys
from keel.signals.norms import global_norm, per_tensor_norms
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES


def parameter_norms(names: Sequence[str], params: Sequence[Tensor]) -> Measurements:
    """``param/norm`` and ``param/norm/<param>`` of these parameters (on their device; one fused read)."""
    norms = per_tensor_norms([p.detach() for p in params])
    return {keys.PARAM_NORM: global_norm(norms), keys.PARAM_NORM_PER_PARAM: PerParam(tuple(names), norms)}


@PROBES.register("param_norm")
class ParamNormProbe:
    name = "param_norm"

    def measure(self, ctx: StepContext) -> Measurements:
        return parameter_norms(ctx.names, ctx.params) if ctx.log_step else {}

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
