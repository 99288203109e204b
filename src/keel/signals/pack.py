"""Packing: many on-device measurements → one tensor → one device→host copy → host values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from keel.signals.probe import Measurements, PerParam


@dataclass
class Packed:
    """The layout of one packed tensor: scalar keys first, then per-parameter families."""

    tensor: Tensor
    scalar_keys: list[str]
    families: list[tuple[str, tuple[str, ...]]]


def pack(measurements: Measurements) -> Packed:
    """Concatenate all measurements into one float64 vector on their device (no sync)."""
    scalar_keys, scalars, families, vectors = [], [], [], []
    for key, value in measurements.items():
        if isinstance(value, PerParam):
            families.append((key, value.names))
            vectors.append(value.values.reshape(-1).to(torch.float64))
        else:
            scalar_keys.append(key)
            scalars.append(value.reshape(()).to(torch.float64))
    parts = ([torch.stack(scalars)] if scalars else []) + vectors
    tensor = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return Packed(tensor, scalar_keys, families)


def unpack(packed: Packed) -> tuple[dict[str, float], dict[str, tuple[tuple[str, ...], list[float]]]]:
    """Copy to host once and split back into scalars and families.

    float64 on the wire keeps float32 signals exact and extreme values (1e38 logits, fp16 scales) intact.
    """
    flat = packed.tensor.tolist()  # the one device→host sync of the step
    n = len(packed.scalar_keys)
    scalars = dict(zip(packed.scalar_keys, flat[:n]))
    families, offset = {}, n
    for key, names in packed.families:
        families[key] = (names, flat[offset : offset + len(names)])
        offset += len(names)
    return scalars, families
