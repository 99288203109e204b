"""Normalization-statistics probe: how far one step moved each BatchNorm layer's running variance.

| key                             | cadence                               | cost                                  |
|---------------------------------|---------------------------------------|---------------------------------------|
| `norm/running_var_jump`         | every step (models with such layers)  | one fused `_foreach_norm` over the    |
|                                 |                                       | ``running_var`` buffers, divide, max  |
| `norm/running_var_jump/<layer>` | as above; stored on `log_every` steps | one float per layer                   |

A BatchNorm layer in train mode normalizes with the batch's own statistics, so a finite corrupt batch (pixels ×1e4,
an image loader that skipped its ``/255``) leaves the loss and the gradient norm looking normal — but the forward
folds the batch's variance into ``running_var`` (momentum 0.1: ×1e4 pixels make it ~1e7 times larger), and every
eval-mode forward after it normalizes with the poisoned statistics (a CIFAR-style ResNet: the first layer's
``running_var`` 0.3 → 3e6, still 5e4 forty steps later). This probe measures, after the forward and before the
update, ``‖running_var‖`` of each layer that tracks running statistics (`torch.nn.modules.batchnorm._NormBase`:
BatchNorm1d/2d/3d, SyncBatchNorm, lazy BatchNorm once materialized, InstanceNorm with ``track_running_stats``) over
its value after the last *applied* update: a skipped update whose statistics keel put back
(`keel.recover.running_stats`) is not the reference of the next step. At most one moving-average step of 0.1 apart,
a healthy ratio is at most ~1.9 after a layer's first batch (the first moves the initial 1 to the data's variance:
`keel.detect.norm_stats_jump` leaves the first steps out). An eval-mode step leaves the statistics as they were:
ratio 1. Buffers are looked up in ``module._buffers`` each step (``model.to()`` and a lazy layer's first forward
replace them); when the buffers are not those of the reference, the step is not measured and sets the reference.

A model without such layers costs nothing (the probe finds none at `attach` and returns ``{}``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import UninitializedBuffer

from keel._core import keys
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES

RUNNING_VAR = "running_var"
TINY = torch.finfo(torch.float32).tiny


def tracking_norm_layers(model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    """(name, buffer dict) of each normalization layer of ``model`` that tracks running statistics.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.InstanceNorm2d(4), nn.LayerNorm(4))
        >>> [name for name, _ in tracking_norm_layers(model)]
        ['1']
    """
    return [
        (name, module._buffers)
        for name, module in model.named_modules()
        if isinstance(module, _NormBase) and module.track_running_stats
    ]


@PROBES.register("norm_stats")
class NormStatsProbe:
    """The largest step-to-step ratio of a normalization layer's ``‖running_var‖``; nothing for models without one.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> probe = NormStatsProbe()
        >>> probe.attach(model)
        >>> ctx = StepContext(step=0, loss=torch.zeros(()), model=model, optimizer=torch.optim.SGD(model.parameters()),
        ...                   names=(), params=(), grads=(), log_step=False)
        >>> _ = model(torch.randn(8, 4)); probe.measure(ctx); probe.after_step(ctx)  # the first: the reference
        {}
        {}
        >>> _ = model(torch.randn(8, 4) * 1e4)  # a corrupt batch
        >>> float(probe.measure(ctx)[keys.NORM_RUNNING_VAR_JUMP]) > 1e6
        True
    """

    name = "norm_stats"

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self._owners: list[dict[str, Any]] = []
        self._held: Tensor | None = None  # per layer: ‖running_var‖ after the last applied update
        self._held_of: list[Tensor] = []  # the buffers ``_held`` was measured on
        self._pending: tuple[Tensor, list[Tensor]] | None = None  # this step's norms, held once the update applies
        self._untouched = torch.ones(0)  # per layer: ‖ones‖, the norm of a layer that has not seen a batch

    def attach(self, model: nn.Module) -> None:
        found = tracking_norm_layers(model)
        self.names = tuple(name for name, _ in found)
        self._owners = [buffers for _, buffers in found]

    def detach(self) -> None:
        self._owners, self._held, self._held_of, self._pending = [], None, [], None

    def measure(self, ctx: StepContext) -> Measurements:
        self._pending = None
        if not self._owners:
            return {}
        found = [buffers.get(RUNNING_VAR) for buffers in self._owners]
        live = [t for t in found if isinstance(t, Tensor) and not isinstance(t, UninitializedBuffer)]
        if len(live) < len(found):
            return {}  # a lazy layer before its first forward: nothing to compare yet
        with torch.no_grad():
            norms = _norms(live)
            self._pending = (norms, live)
            if self._held is None or not same_tensors(live, self._held_of):
                # the first step, or new buffers (model.to, a lazy layer's first forward): the reference only
                self._untouched = _norms([torch.ones_like(t) for t in live])
                return {}
            # a layer still at its initial variance (1) when its first batch comes (a branch trained later, a model
            # in eval mode for its first steps) moves to the data's variance: that is not a jump
            ratio = torch.where(self._held == self._untouched, 1.0, norms / self._held.clamp_min(TINY))
        return {
            keys.NORM_RUNNING_VAR_JUMP: ratio.amax(),
            keys.NORM_RUNNING_VAR_JUMP_PER_LAYER: PerParam(self.names, ratio),
        }

    def after_step(self, ctx: StepContext) -> Measurements:
        """The update applied: its statistics are the next step's reference (a skipped one's were put back)."""
        if self._pending is not None:
            self._held, self._held_of = self._pending
            self._pending = None
        return {}


def _norms(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of each tensor, float32, in one fused pass; accumulated in float32 at least (a half buffer's norm
    overflows from ~65504 on) and in float64 when a buffer is float64 (it cannot be narrowed in the kernel)."""
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=wide)).float()


def same_tensors(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether ``a`` and ``b`` are the very same tensors, in order (``model.to`` and a lazy layer's first forward
    replace a module's buffers: values measured on the old ones say nothing of the new)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
