"""The normalization layers' running statistics, put back when an update is skipped.

A BatchNorm layer in train mode updates ``running_mean``, ``running_var`` and ``num_batches_tracked`` in the
*forward*, before keel sees the step. Skipping the update (the optimizer's step) leaves them holding the skipped
batch: a batch with one NaN pixel makes them NaN for good, and since train mode normalizes with each batch's own
statistics the training loss goes on looking healthy while every eval-mode forward returns NaN (a CIFAR-style ResNet
under ``policy="skip"``: one NaN image, one skip, eval loss NaN to the end of the run). So under ``skip`` and
``recover`` keel copies these buffers after each applied update and puts them back when an update is not applied
— keel's skip, or a GradScaler's overflow skip — so that a skipped step leaves the model as it found it. A rollback
restores them with the snapshot. Cost: one fused copy of the statistics per update (ResNet-50's 53 layers, 45k
values: ~0.1 ms of CPU); none for a model without such layers. ``observe`` never touches them. Under
``Guard(sync="deferred")`` the skip is decided on the device and the statistics are not restored (the host learns
of the skip one step late).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer

from keel.signals.norm_stats import same_tensors, tracking_norm_layers

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class RunningStats:
    """Copies of a model's normalization running statistics, taken with `save`, put back with `restore`.

    The buffers are looked up in their modules at each call: ``model.to(...)`` and a lazy layer's first forward
    replace them, and the copies of the old ones must not be written into the new (a `restore` after such a
    replacement does nothing; the next `save` copies the new ones).
    """

    def __init__(self, owners: list[tuple[dict[str, Tensor | None], str]]) -> None:
        self.owners = owners  # (the module's buffer dict, the buffer's name)
        self.saved: list[Tensor] | None = None
        self._saved_from: list[Tensor] = []  # the buffers the copies were taken of
        self.save()

    @classmethod
    def of(cls, model: nn.Module) -> RunningStats | None:
        """The running statistics of every BatchNorm/InstanceNorm layer that tracks them; None when there is none."""
        owners: list[tuple[dict[str, Tensor | None], str]] = [
            (buffers, name)
            for _, buffers in tracking_norm_layers(model)
            for name in STATISTICS
            if isinstance(buffers.get(name), Tensor)
        ]
        return cls(owners) if owners else None

    def live(self) -> list[Tensor]:
        """The buffers now (a dict lookup each: ``getattr`` on a module costs ten times more)."""
        return [buffers[name] for buffers, name in self.owners]  # type: ignore[misc]

    def save(self) -> None:
        """Hold the statistics as they are now (after an applied update)."""
        live = self.live()
        with torch.no_grad():
            if self.saved is not None and same_tensors(live, self._saved_from):
                torch._foreach_copy_(self.saved, live)
            elif any(isinstance(t, UninitializedBuffer) for t in live):
                self.saved, self._saved_from = None, []  # a lazy layer before its first forward: nothing to hold
            else:
                self.saved, self._saved_from = [t.detach().clone() for t in live], live

    def restore(self) -> bool:
        """Put back the statistics last held (a skipped update's forward had changed them); False when nothing is
        held for the buffers there are now."""
        live = self.live()
        if self.saved is None or not same_tensors(live, self._saved_from):
            return False
        with torch.no_grad():
            torch._foreach_copy_(live, self.saved)
        return True
