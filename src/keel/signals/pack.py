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
    return Packed(torch.cat([p.to(torch.float64) if p.dtype != torch.float32 else p for p in parts])
                  .to(torch.float64), layout)


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
