"""Packing: groups of on-device measurements → one tensor → one device→host copy → host values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from keel.signals.probe import Measurements, PerParam

HostValues = tuple[dict[str, float], dict[str, tuple[tuple[str, ...], list[float]]]]


@dataclass
class Packed:
    """One packed tensor and, per group, its scalar keys and per-parameter families in order."""

    tensor: Tensor
    layout: list[tuple[list[str], list[tuple[str, tuple[str, ...]]]]]


def pack(*groups: Measurements) -> Packed:
    """Concatenate the measurements of all groups into one float64 vector on their device (no sync).

    float64 on the wire keeps float32 signals exact and extreme values (1e38 logits) intact. One ``cat``
    and one conversion, whatever the number of measurements: on small models each extra op is a visible
    part of keel's cost per step.
    """
    parts: list[Tensor] = []
    layout = []
    for group in groups:
        scalar_keys, families = [], []
        for key, value in group.items():
            if isinstance(value, PerParam):
                families.append((key, value.names))
            else:
                scalar_keys.append(key)
                parts.append(value.reshape(1))
        parts.extend(v.values.reshape(-1) for v in group.values() if isinstance(v, PerParam))
        layout.append((scalar_keys, families))
    if not parts:
        return Packed(torch.zeros(0, dtype=torch.float64), layout)
    return Packed(
        torch.cat([p.to(torch.float64) if p.dtype != torch.float32 else p for p in parts]).to(torch.float64), layout
    )


def unpack(packed: Packed) -> list[HostValues]:
    """Copy to host once; per group, (scalars by key, families as (names, values))."""
    flat = packed.tensor.tolist()  # the one device→host sync of the step
    out, offset = [], 0
    for scalar_keys, families in packed.layout:
        scalars = dict(zip(scalar_keys, flat[offset : offset + len(scalar_keys)], strict=True))
        offset += len(scalar_keys)
        per_param = {}
        for key, names in families:
            per_param[key] = (names, flat[offset : offset + len(names)])
            offset += len(names)
        out.append((scalars, per_param))
    return out


class HostCopy:
    """One packed step on its way to the host without a sync: the deferred half of `unpack`.

    `start` queues the device→host copy (into pinned memory, on CUDA, fenced by an event) and returns at once;
    `land`, called a step later, finds it complete — the copy ran while the next forward and backward were
    queued — and reads it. On CPU the copy is a plain one. ``syncs`` counts the reads that had to wait for the
    device (a `land` whose copy was not finished yet): the deferred path's promise is that a healthy step adds
    none.

    Example:
        >>> copy = HostCopy()
        >>> copy.start(pack({"loss": torch.tensor(2.0)}))
        >>> copy.land()[0][0]
        {'loss': 2.0}
    """

    def __init__(self) -> None:
        self._packed: Packed | None = None
        self._host: Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self.syncs = 0

    @property
    def pending(self) -> bool:
        return self._packed is not None

    def start(self, packed: Packed) -> None:
        """Queue ``packed``'s copy to the host (one at a time: `land` the previous one first)."""
        if self._packed is not None:
            raise RuntimeError("HostCopy.start() while a copy is in flight; land() it first")
        tensor = packed.tensor
        if tensor.is_cuda:
            if self._host is None or self._host.shape != tensor.shape:
                self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.detach().clone()  # the values of this step, whatever later steps do in place
        self._packed = packed

    def land(self) -> list[HostValues]:
        """The values of the copy in flight, per group as `unpack` gives them."""
        if self._packed is None or self._host is None:  # start() sets both
            raise RuntimeError("HostCopy.land() with no copy in flight")
        if self._event is not None:
            if not self._event.query():
                self.syncs += 1
            self._event.synchronize()
            self._event = None
        packed, self._packed = Packed(self._host, self._packed.layout), None
        return unpack(packed)
