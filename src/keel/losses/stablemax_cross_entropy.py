"""StableMax cross-entropy: a softmax replacement that grows linearly, so it cannot collapse numerically.

From Prieto et al. (2025), "Grokking at the edge of numerical stability" (arXiv 2501.04697).
"""

from __future__ import annotations

import torch
from torch import Tensor

_REDUCTIONS = ("mean", "sum", "none")


def stablemax_s(x: Tensor) -> Tensor:
    """The StableMax map s(x) = x + 1 for x ≥ 0 and 1 / (1 − x) for x < 0, elementwise.

    Both branches are evaluated on clamped inputs so that neither produces inf or NaN where it is not
    selected: a plain ``torch.where`` over ``1/(1 − x)`` gives NaN gradients at x = 1, because the
    backward of the unselected branch multiplies 0 by an infinite derivative.
    s is continuously differentiable, with s(0) = 1 and s'(0) = 1 from both sides.
    """
    positive = 1.0 + x.clamp(min=0.0)
    negative = 1.0 / (1.0 - x.clamp(max=0.0))
    return torch.where(x >= 0, positive, negative)


def stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """StableMax probabilities s(x_i) / Σ_j s(x_j) along ``dim``.

    A slice with a single +inf logit gets its limit, probability 1 there and 0 elsewhere (inf/inf was NaN),
    as `log_stablemax` gives; with several +inf the limit is undefined and those entries are NaN in both.

    Example:
        >>> stablemax(torch.tensor([100.0, 0.0, -100.0]))
        tensor([9.9010e-01, 9.8030e-03, 9.7059e-05])
    """
    x = _upcast(logits)
    s = stablemax_s(x)
    probs = s / s.sum(dim=dim, keepdim=True)
    infinite = torch.isposinf(x)
    single = infinite.sum(dim=dim, keepdim=True) == 1
    return torch.where(single, infinite.to(probs.dtype), probs)


def log_stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """log StableMax along ``dim``, to full relative precision in float32.

    log s(x_i) − log Σ_j s(x_j), with log s from log1p; for the largest term, whose probability may be
    close to 1 where that difference cancels, −log1p(Σ_{j≠max} s_j / s_max) with the rest summed directly.
    """
    x = _upcast(logits)
    s = stablemax_s(x)
    out = _log_s(x) - torch.log(s.sum(dim=dim, keepdim=True))
    top = s.argmax(dim=dim, keepdim=True)
    rest = s.scatter(dim, top, 0.0).sum(dim=dim, keepdim=True)
    return out.scatter(dim, top, -torch.log1p(rest / s.gather(dim, top)))


def stablemax_cross_entropy(logits: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Cross-entropy with StableMax in place of softmax: −log StableMax(x)_y.

    Use it as the output loss when float32 softmax cross-entropy stops learning because the softmax has
    collapsed: once the correct logit leads the others by more than ~17 (float32) every other exp term
    underflows against it, the loss rounds to exactly 0 and so does its gradient ("Softmax Collapse").
    s grows linearly, so the non-target terms never vanish.

    It is computed as log1p(Σ_{j≠y} s(x_j) / s(x_y)), summing the non-target terms directly, so the loss
    keeps full relative precision when it is tiny and needs no float64 (the reference casts to float64).
    Where that ratio overflows (a target logit ≲ −1e38 in float32) it is log Σ_{j≠y} s(x_j) − log s(x_y),
    with log s(x_y) = −log1p(−x_y): finite, as in float64.

    Args:
        logits: ``(N, C)`` or ``(..., C)`` scores; half precision is computed in float32.
        target: ``(N,)`` or ``(...)`` integer class indices.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The loss (0-d, or shaped like ``target`` for ``"none"``), float32 (float64 for float64 logits).

    Raises:
        ValueError: unknown ``reduction`` or mismatched shapes.

    Example:
        >>> logits = torch.tensor([[100.0, 0.0, -100.0]])
        >>> round(stablemax_cross_entropy(logits, torch.tensor([0])).item(), 5)
        0.00995

    References:
        Prieto, Barsbey, Mediano, Birdal (2025), "Grokking at the edge of numerical stability",
        arXiv 2501.04697. Official code: LucasPrietoAl/grokking-at-the-edge-of-numerical-stability,
        ``utils.py`` (``stablemax_cross_entropy``).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed: {', '.join(_REDUCTIONS)}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"target.shape={tuple(target.shape)}; allowed: the logits' leading shape {tuple(logits.shape[:-1])}"
        )
    x = _upcast(logits)
    s = stablemax_s(x)
    index = target.long().unsqueeze(-1)
    x_target = x.gather(-1, index).squeeze(-1)
    s_target = s.gather(-1, index).squeeze(-1)
    # Summing the other terms directly (not Σ s − s_y) avoids cancellation when the target dominates.
    s_other = s.scatter(-1, index, 0.0).sum(dim=-1)
    with torch.no_grad():
        overflowed = torch.isinf(s_other / s_target) & torch.isfinite(s_other)
    # Each branch sees safe inputs, so the unselected one's backward cannot give 0 · inf = NaN.
    ratio = s_other / torch.where(overflowed, 1.0, s_target)
    loss = torch.where(
        overflowed,
        torch.log(torch.where(overflowed, s_other, 1.0)) - _log_s(torch.where(overflowed, x_target, 0.0)),
        torch.log1p(ratio),
    )
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _log_s(x: Tensor) -> Tensor:
    """log s(x) from log1p, exact where s(x) itself is subnormal or overflows."""
    return torch.log1p(x.clamp(min=0.0)) - torch.log1p(-x.clamp(max=0.0))


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
