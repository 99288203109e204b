"""Gradient–weight cosine probe: how much of the gradient only rescales the weights (naïve loss minimisation).

| key                       | cadence                               | cost                                       |
|---------------------------|---------------------------------------|--------------------------------------------|
| `grad/weight_cos`         | every `every` steps                   | three fused multiplies, one sum per tensor |
| `grad/weight_cos/<param>` | as above; stored on `log_every` steps | one float per parameter tensor             |

The three fused multiplies run over gradients and weights in float32.

cos(g, w) = ⟨g, w⟩ / (‖g‖ ‖w‖), over all parameters and per tensor. Near −1, the descent direction −g
points along w: the optimizer mostly scales the weights up, which sharpens the softmax without changing
its argmax — "naïve loss minimisation", the road to Softmax Collapse (Prieto et al. 2025). ⊥Grad removes
that component. A tensor of zeros (a zero-initialised bias) gives 0.

References:
    Prieto et al. 2025, "Grokking at the Edge of Numerical Stability", arXiv 2501.04697; code
    github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability (``orthograd.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from keel._core import keys
from keel._core.validate import check_types, config_from
from keel.signals.attn_logits import due
from keel.signals.norms import accumulation_dtype
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES


@dataclass(kw_only=True)
class GradWeightCosConfig:
    """Settings of the gradient–weight cosine probe.

    Attributes:
        every: Cadence in steps.
    """

    every: int = 10

    def __post_init__(self) -> None:
        check_types(self)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"GradWeightCosConfig.every={self.every!r}; allowed: an int >= 1")


def grad_weight_cosines(grads: Sequence[Tensor], params: Sequence[Tensor], eps: float = 1e-30) -> tuple[Tensor, Tensor]:
    """(cosine over all tensors, cosine per tensor), float32; 0 where a norm is 0.

    Example:
        >>> g = [torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 1.0])]
        >>> w = [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])]
        >>> grad_weight_cosines(g, w)
        (tensor(-0.6325), tensor([-1.,  0.]))
    """
    if not grads:
        return torch.zeros(()), torch.zeros(0)
    # float32 accumulation (float64 stays float64): an fp16 dot product of a large tensor would overflow; a complex
    # tensor as its real and imaginary parts, whose dot product is Re⟨g, w⟩
    g = [_real(t).to(accumulation_dtype(_real(t).dtype)) for t in grads]
    w = [_real(t).to(a.dtype) for t, a in zip(params, g, strict=True)]
    dots = torch.stack([d.sum() for d in torch._foreach_mul(g, w)])
    g_sq = torch.stack([d.sum() for d in torch._foreach_mul(g, g)])
    w_sq = torch.stack([d.sum() for d in torch._foreach_mul(w, w)])
    per = dots / ((g_sq * w_sq).sqrt() + eps)
    total = dots.sum() / ((g_sq.sum() * w_sq.sum()).sqrt() + eps)
    return total.float(), per.float()


def _real(t: Tensor) -> Tensor:
    t = t.detach()
    return torch.view_as_real(t) if t.is_complex() else t


@PROBES.register("grad_weight_cos")
class GradWeightCosProbe:
    name = "grad_weight_cos"

    def __init__(self, config: GradWeightCosConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, GradWeightCosConfig, config, fields)

    def measure(self, ctx: StepContext) -> Measurements:
        if not due(ctx.step, self.config.every) or not ctx.grads:
            return {}
        with torch.no_grad():
            total, per = grad_weight_cosines(ctx.grads, ctx.params)
        return {keys.GRAD_WEIGHT_COS: total, keys.GRAD_WEIGHT_COS_PER_PARAM: PerParam(ctx.names, per)}

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
