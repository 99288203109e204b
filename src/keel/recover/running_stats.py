"""The normalization layers' running statistics, put back when an update is skipped.

A BatchNorm layer in train mode updates ``running_mean``, ``running_var`` and ``num_batches_tracked`` in the
*forward*, before keel sees the step. Skipping the update (the optimizer's step) leaves them holding the skipped
batch: a batch with one NaN pixel makes them NaN for good, and since train mode normalizes with each batch's own
statistics the training loss goes on looking healthy while every eval-mode forward returns NaN (a CIFAR-style ResNet
under ``policy="skip"``: one NaN image, one skip, eval loss NaN to the end of the run). So under ``skip`` and
``recover`` keel copies these buffers after each applied update and puts them back when an update is not applied
— keel's skip, or a GradScaler's overflow skip — so that a skipped step leaves the model as it found it. A rollback
restores them with the snapshot. Cost: one fused copy of the statistics per update (a ResNet-50 holds 53k values);
none for a model without such layers. ``observe`` never touches them. Under ``Guard(sync="deferred")`` the skip is
decided on the device and the statistics are not restored (the host learns of the skip one step late).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import UninitializedBuffer

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class RunningStats:
    """Copies of a model's normalization running statistics, taken with `save`, put back with `restore`.

    The buffers are looked up by module and name at each call: ``model.to(...)`` and a lazy layer's first forward
    replace them, and a copy of the old ones must not be written into the new.
    """

    def __init__(self, owners: list[tuple[nn.Module, str]]) -> None:
        self.owners = owners
        self.saved: list[Tensor] | None = None
        self.save()

    @classmethod
    def of(cls, model: nn.Module) -> RunningStats | None:
        """The running statistics of every BatchNorm/InstanceNorm layer that tracks them; None when there is none."""
        owners: list[tuple[nn.Module, str]] = [
            (module, name)
            for module in model.modules()
            if isinstance(module, _NormBase) and module.track_running_stats
            for name in STATISTICS
            if isinstance(getattr(module, name, None), Tensor)
        ]
        return cls(owners) if owners else None

    def live(self) -> list[Tensor] | None:
        """The buffers now; None while a lazy layer's are not materialized yet."""
        live = [getattr(module, name) for module, name in self.owners]
        return None if any(isinstance(t, UninitializedBuffer) for t in live) else live

    def save(self) -> None:
        """Hold the statistics as they are now (after an applied update)."""
        live = self.live()
        if live is None:
            self.saved = None
        elif self.saved is not None and _alike(self.saved, live):
            with torch.no_grad():
                torch._foreach_copy_(self.saved, live)
        else:
            self.saved = [t.detach().clone() for t in live]

    def restore(self) -> bool:
        """Put back the statistics last held (a skipped update's forward had changed them); False when none are
        held that fit the buffers now."""
        live = self.live()
        if live is None or self.saved is None or not _alike(self.saved, live):
            return False
        with torch.no_grad():
            torch._foreach_copy_(live, self.saved)
        return True


def _alike(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(x.shape == y.shape and x.dtype == y.dtype and x.device == y.device for x, y in zip(a, b, strict=True))
