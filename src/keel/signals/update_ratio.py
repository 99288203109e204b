"""Update-ratio probe: how large the optimizer's update is relative to the weights, per parameter.

| key                    | cadence           | cost                                                      |
|------------------------|-------------------|-----------------------------------------------------------|
| `update/norm`          | `log_every` steps | one copy of the trainable parameters, held across the step |
| `update/ratio`         | `log_every` steps | ‖Δθ‖/‖θ‖ over all parameters                               |
| `update/ratio/<param>` | `log_every` steps | one float per parameter tensor                             |

The update is measured as θ_after − θ_before, so it covers any optimizer, weight decay and clipping. Adam
update-norm spikes were seen to precede gradient-norm and loss spikes (marin-community/marin#1368); a
healthy ratio is around 1e-3 per step (Karpathy, "A Recipe for Training Neural Networks").
"""

from __future__ import annotations

import torch

from keel._core import keys
from keel.signals.norms import global_norm, per_tensor_norms, update_ratios
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES


@PROBES.register("update_ratio")
class UpdateRatioProbe:
    name = "update_ratio"

    def __init__(self) -> None:
        self._before: list[torch.Tensor] | None = None

    def measure(self, ctx: StepContext) -> Measurements:
        # Only a copy is taken here; the ratio is computed once the optimizer has stepped.
        self._before = [p.detach().clone() for p in ctx.params] if ctx.log_step else None
        return {}

    def after_step(self, ctx: StepContext) -> Measurements:
        before, self._before = self._before, None
        if before is None or len(before) != len(ctx.params):
            return {}
        deltas = torch._foreach_sub([p.detach() for p in ctx.params], before)
        update_norms = per_tensor_norms(deltas)
        param_norms = per_tensor_norms(before)
        total_update = global_norm(update_norms)
        return {
            keys.UPDATE_NORM: total_update,
            keys.UPDATE_RATIO: total_update / (global_norm(param_norms) + 1e-12),
            keys.UPDATE_RATIO_PER_PARAM: PerParam(ctx.names, update_ratios(update_norms, param_norms)),
        }
