"""Confidence-guided annealing (CGA): OFQ's cool-down phase, in which only the weights next to a rounding boundary
still train, as a gradient transform for any optimizer.

After Liu et al. 2023, "Oscillation-free Quantization for Low-bit Vision Transformers" (OFQ), ICML, arXiv 2302.02210;
official code ``nbasyl/OFQ`` ``cga.py`` (``freeze_outside_boundary_weight_idx``) and
``src/quantization/quantizer/statsq.py`` (``StatsQuantizer_specific_4_qkreparam_cga``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle


def unconfident(positions: Tensor, boundary_range: float) -> Tensor:
    """Where a weight's pre-rounding position b lies within ``boundary_range`` of a rounding boundary
    (frac(b) ∈ [0.5 − BR, 0.5 + BR]): the weights CGA keeps training. A non-finite position is not unconfident.

    Example:
        >>> unconfident(torch.tensor([0.5, 1.496, -0.503, 0.2, 1.0]), 0.005).tolist()
        [True, True, True, False, False]
    """
    frac = positions - positions.floor()
    return (frac - 0.5).abs() <= boundary_range


class ConfidenceGuidedAnnealing:
    """Freeze every quantized weight that is confident (far from a rounding boundary); train only the rest.

    OFQ's remedy for weight oscillation in quantization-aware training, used as the last phase of a run (OFQ: 15–30
    epochs while the LR anneals). At each step, per StatsQ layer: the pre-rounding positions b of the weights are
    read, the weights whose b is more than ``boundary_range`` from a boundary (frac(b) = 0.5) are *confident*; their
    gradient is zeroed before ``optimizer.step()`` and their values are put back after it, so weight decay and
    momentum cannot move them either. A weight near a boundary may still cross it; once it has moved away it is
    confident and frozen in turn, so the codes stop flipping and the oscillation anneals to zero.

    Layers: `keel.nn.fake_quant.FakeQuantLinear` modules whose grid has ``positions`` (`keel.nn.statsq.
    StatsQuantizer`). Memory: a copy of each frozen layer's weight per step (restored after the step).

    Args:
        layers: The quantized layers (`ConfidenceGuidedAnnealing.for_model` collects them).
        boundary_range: BR, half-width of the band around a boundary that keeps training (OFQ: 0.005 by default,
            0.003–0.01 tried, 0.005–0.007 best).

    Raises:
        ValueError: no layer, a layer without a StatsQ-like grid, or BR not in (0, 0.5].

    Example:
        >>> from keel.nn import fake_quantize
        >>> model = fake_quantize(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), "statsq", bits=2, exclude=())
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> handles = ConfidenceGuidedAnnealing.for_model(model).attach(opt)  # the cool-down phase begins
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> opt.step()

    References:
        Liu et al. 2023, OFQ, arXiv 2302.02210, ``nbasyl/OFQ`` ``cga.py``.
    """

    def __init__(self, layers: Iterable[nn.Module], *, boundary_range: float = 0.005) -> None:
        if not (isinstance(boundary_range, int | float) and not isinstance(boundary_range, bool)) or not (
            0 < boundary_range <= 0.5 and math.isfinite(boundary_range)
        ):
            raise ValueError(
                f"ConfidenceGuidedAnnealing.boundary_range={boundary_range!r}; allowed: a number in (0, 0.5]"
            )
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("ConfidenceGuidedAnnealing got no layer; allowed: at least one StatsQ layer")
        for i, layer in enumerate(self.layers):
            if not callable(getattr(getattr(layer, "weight_quantizer", None), "positions", None)):
                raise ValueError(
                    f"ConfidenceGuidedAnnealing layers[{i}] is a {type(layer).__name__} without a grid that has "
                    "positions(); allowed: fake_quantize(model, 'statsq') layers"
                )
        self.boundary_range = float(boundary_range)
        self._frozen: list[tuple[Tensor, Tensor, Tensor]] = []  # (weight, confident mask, saved values)
        self._masks: list[Tensor] = []  # the last step's confident masks (for `frozen_share`)

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> ConfidenceGuidedAnnealing:
        """CGA over every StatsQ layer of ``model``."""
        layers = [
            m for m in model.modules() if callable(getattr(getattr(m, "weight_quantizer", None), "positions", None))
        ]
        if not layers:
            raise ValueError(
                f"ConfidenceGuidedAnnealing.for_model found no StatsQ layer in {type(model).__name__}; allowed: a "
                "model after fake_quantize(model, 'statsq', bits=...)"
            )
        return cls(layers, **kwargs)

    @torch.no_grad()
    def freeze_(self) -> None:
        """Before the step: zero the confident weights' gradients and remember their values."""
        self._frozen = []
        for layer in self.layers:
            weight: Tensor = layer.weight  # type: ignore[assignment]
            positions: Callable[[Tensor], Tensor] = layer.weight_quantizer.positions  # type: ignore[union-attr,assignment]
            confident = ~unconfident(positions(weight), self.boundary_range)
            if weight.grad is not None:
                weight.grad.masked_fill_(confident, 0)
            self._frozen.append((weight, confident, weight.detach().clone()))
        self._masks = [confident for _, confident, _ in self._frozen]

    @torch.no_grad()
    def restore_(self) -> None:
        """After the step: put the confident weights back (cancels weight decay and momentum drift)."""
        for weight, confident, saved in self._frozen:
            weight.copy_(torch.where(confident, saved, weight))
        self._frozen = []

    def frozen_share(self) -> float:
        """The share of the layers' weights frozen at the last `freeze_` (a host read: for reports, not per step)."""
        total = sum(c.numel() for c in self._masks)
        return sum(int(c.sum()) for c in self._masks) / total if total else math.nan

    def attach(self, optimizer: Optimizer) -> tuple[RemovableHandle, RemovableHandle]:
        """Run `freeze_` before and `restore_` after every ``optimizer.step()``; returns both hooks' handles."""

        def pre(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.freeze_()

        def post(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.restore_()

        return optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)
