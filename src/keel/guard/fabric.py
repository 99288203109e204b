"""Lightning Fabric's optimizer, seen through: ``model, opt = fabric.setup(model, opt)`` returns a wrapper whose
``step()`` runs Fabric's precision plugin (under ``16-mixed``, its GradScaler's ``step`` and ``update``) around the
optimizer it wraps. keel steps, skips and measures at the wrapped optimizer, with the plugin's GradScaler as the
loop's scaler: hooked on the wrapper, keel judged and clipped the scaled gradients (× the loss scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def fabric_wrapped(optimizer: Any) -> Any:
    """The optimizer a Lightning Fabric optimizer wraps (``model, opt = fabric.setup(model, opt)``), else ``optimizer``.

    Fabric's ``opt.step()`` goes through its precision plugin, which under ``16-mixed`` runs its GradScaler's ``step``
    (unscale, inf check, the inner optimizer's ``step()``) and ``update``. keel hooks the wrapped optimizer's
    ``step()``, where the loop's update arrives with the gradients unscaled (hooked on Fabric's, keel judged the
    scaled gradients, x the loss scale, and, given the scaler, stepped it around Fabric's own step and update:
    "No inf checks were recorded prior to update"). Not under DeepSpeed, whose engine makes the update."""
    if not any(cls.__name__ == "_FabricOptimizer" for cls in type(optimizer).__mro__):
        return optimizer
    strategy = getattr(optimizer, "_strategy", None)
    inner = getattr(optimizer, "optimizer", None)
    deepspeed = hasattr(strategy, "model")  # as Fabric's own step() tells DeepSpeed's strategy apart
    return inner if isinstance(inner, torch.optim.Optimizer) and not deepspeed else optimizer


def fabric_scaler_of(optimizers: Sequence[Any]) -> torch.amp.GradScaler | None:
    """The GradScaler of the Fabric precision plugin that steps ``optimizers`` (``16-mixed`` on a GPU), if any: the
    scale of the losses ``fabric.backward`` differentiates, and the scaler whose step and update the loop's
    ``opt.step()`` runs. None for other optimizers and precisions."""
    for optimizer in optimizers:
        if fabric_wrapped(optimizer) is not optimizer:
            scaler = getattr(getattr(getattr(optimizer, "_strategy", None), "precision", None), "scaler", None)
            if isinstance(scaler, torch.amp.GradScaler):
                return scaler
    return None
