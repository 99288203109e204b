"""StatsQ: OFQ's statistical weight quantizer (a scale from the weights' statistics, not learned), as a fake-quant grid.

After Liu et al. 2023, "Oscillation-free Quantization for Low-bit Vision Transformers" (OFQ), ICML, arXiv 2302.02210;
official code ``nbasyl/OFQ`` ``src/quantization/quantizer/statsq.py`` (``StatsQuantizer``).

Per output row of a weight W (``weight[i]``, all other dimensions reduced), with n = 2^(b−1) for b bits:

    s = 2·mean|W_i|                       (detached: no gradient flows into the scale)
    b = clip(W/s, −1, 1 − 1e-6)·n − 0.5   (the pre-rounding position, `statsq_position`)
    code = round(b)  ∈ {−n, …, n − 1}     (`statsq_levels`)
    Q = s·(code + 0.5)/n

The levels are symmetric and exclude zero: 2 bits give {±0.25, ±0.75}·s, 3 bits {±1/8, ±3/8, ±5/8, ±7/8}·s. The
gradient is the straight-through estimator's identity (dQ/dW = 1). A learnable scale (LSQ) moves the rounding
boundaries under the weights at every step and makes weights oscillate between two levels; a scale that follows
the weights' mean magnitude moves slowly, which is OFQ's first remedy. ``torch.round`` rounds half to even, as the
official code's does; a weight exactly on a boundary (b = k + 0.5) is a measure-zero event. A row of zeros gets
s = the dtype's smallest normal, so it quantizes to ±s/(2n) instead of NaN.

`StatsQuantizer` is registered as ``"statsq"`` in keel's fake-quant registry: ``fake_quantize(model, "statsq",
bits=2)`` (`keel.nn.fake_quant`) puts it on every ``nn.Linear`` but the output head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from keel.nn.fake_quant import QUANTIZERS, FakeQuantizer

# OFQ clips at 1 − 1e-6 so that W/s = 1 lands in the top level (round(n − 0.5 − 1e-6·n) = n − 1), not above it
_TOP = 1.0 - 1e-6
BITS = (2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: object) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"StatsQ bits={bits!r}; allowed: one of {BITS}")
    return bits


def _acc(weight: Tensor) -> Tensor:
    """The weight in the dtype the statistics are taken in: float64 kept, half types raised to float32."""
    return weight if weight.dtype in (torch.float32, torch.float64) else weight.float()


def statsq_scale(weight: Tensor) -> Tensor:
    """s = 2·mean|W| per output row (``weight.shape[0]``), detached; shaped to broadcast against ``weight``.

    Example:
        >>> statsq_scale(torch.tensor([[1.0, -3.0], [0.5, 0.5]])).flatten().tolist()
        [4.0, 1.0]
    """
    w = _acc(weight.detach())
    mean_abs = w.abs().flatten(1).mean(1) if w.dim() > 1 else w.abs().mean().reshape(1)
    scale = (2 * mean_abs).clamp_min(torch.finfo(w.dtype).smallest_normal)
    return scale.reshape(-1, *([1] * (w.dim() - 1))) if w.dim() > 1 else scale


def statsq_position(weight: Tensor, bits: int) -> Tensor:
    """The pre-rounding position b = clip(W/s, −1, 1 − 1e-6)·n − 0.5 of every weight (float, ``weight``'s shape).

    Rounding boundaries sit where frac(b) = 0.5; CGA (`keel.optim.cga`) keeps training only the weights near one.

    Example:
        >>> [round(b, 4) for b in statsq_position(torch.tensor([[0.1, -0.3]]), 2)[0].tolist()]  # s = 0.4, n = 2
        [0.0, -2.0]
    """
    w = _acc(weight.detach())
    return _position(w, statsq_scale(w), 2 ** (_check_bits(bits) - 1))


def _position(w: Tensor, scale: Tensor, n: int) -> Tensor:
    return (w / scale).clamp_(-1.0, _TOP).mul_(n).sub_(0.5)  # in place on the quotient: one allocation


def statsq_levels(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(codes, values): round(b) ∈ {−n, …, n − 1} as int8, and Q = s·(round(b) + 0.5)/n in ``weight``'s dtype; no
    gradient flows through either.

    Example:
        >>> w = torch.tensor([[0.1, -0.3, 0.25, -0.15]])  # s = 2·mean|W| = 0.4: levels ±0.1, ±0.3
        >>> codes, values = statsq_levels(w, 2)
        >>> codes.tolist(), [round(q, 4) for q in values[0].tolist()]
        ([[0, -2, 1, -1]], [0.1, -0.3, 0.3, -0.1])
    """
    n = 2 ** (_check_bits(bits) - 1)
    w = _acc(weight.detach())
    scale = statsq_scale(w)
    codes = _position(w, scale, n).round_()
    values = (codes + 0.5).mul_(scale).div_(n)
    return codes.to(torch.int8), values.to(weight.dtype)


def statsq_quantize(weight: Tensor, bits: int) -> Tensor:
    """Q (`statsq_levels`) in the forward, the straight-through estimator's identity in the backward."""
    return weight + (statsq_levels(weight, bits)[1] - weight).detach()


@QUANTIZERS.register("statsq")
class StatsQuantizer(FakeQuantizer):
    """OFQ's StatsQ grid: per output row s = 2·mean|W| (detached), b-bit symmetric levels without zero, STE.

    Use it through ``fake_quantize(model, "statsq", bits=b)``; the layers' ``quantized_codes()`` are then the StatsQ
    codes round(b) ∈ {−n, …, n − 1} (int8), and `positions` gives the pre-rounding values CGA reads
    (`keel.optim.cga`). A weight whose row holds a NaN or ±Inf quantizes to NaN (its row's scale is NaN).

    Args:
        bits: Bits per weight, 2–8 (OFQ's DeiT runs: 2, 3 and 4).

    Example:
        >>> from torch import nn
        >>> from keel.nn.fake_quant import fake_quantize
        >>> model = fake_quantize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "statsq", bits=2,
        ...                       exclude=())
        >>> sorted(set(model[0].quantized_codes().flatten().tolist())) <= [-2, -1, 0, 1]
        True

    References:
        Liu et al. 2023, OFQ, ICML, arXiv 2302.02210; ``nbasyl/OFQ`` ``src/quantization/quantizer/statsq.py``.
    """

    name: ClassVar[str] = "statsq"

    def __init__(self, *, bits: int = 4) -> None:
        super().__init__()
        self.bits = _check_bits(bits)

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return statsq_levels(x, self.bits)

    def positions(self, x: Tensor) -> Tensor:
        """The pre-rounding position b of every element of ``x`` (`statsq_position`)."""
        return statsq_position(x, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        return statsq_quantize(x, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
