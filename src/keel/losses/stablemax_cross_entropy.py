"""StableMax cross-entropy: a softmax replacement that grows linearly, so it cannot collapse numerically.

From Prieto et al. (2025), "Grokking at the edge of numerical stability" (arXiv 2501.04697).
"""

from __future__ import annotations

import torch
from torch import Tensor

from keel.losses._checks import is_int

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


IGNORE_INDEX = -100  # F.cross_entropy's default, and Hugging Face's label for padding and prompt tokens


def stablemax_cross_entropy(
    logits: Tensor, target: Tensor, *, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
) -> Tensor:
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
        reduction: ``"mean"`` (over the tokens not ignored), ``"sum"`` or ``"none"``.
        ignore_index: Targets with this value count for nothing, in value and gradient, whatever their logits
            (as ``F.cross_entropy``: -100, Hugging Face's label for padding). A batch with every target ignored
            gives 0 (``F.cross_entropy`` gives NaN for ``"mean"``).

    Returns:
        The loss (0-d, or shaped like ``target`` for ``"none"``, 0 at ignored targets), float32 (float64 for
        float64 logits).

    Raises:
        ValueError: unknown ``reduction``, mismatched shapes, a target that is not of an integer dtype (a float
            target was truncated to a class index) or an ``ignore_index`` that is not an int.

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
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target.dtype={target.dtype}; allowed: an integer dtype (class indices)")
    if not is_int(ignore_index):
        raise ValueError(f"ignore_index={ignore_index!r}; allowed: an int (F.cross_entropy's -100 by default)")
    ignored = target == ignore_index
    # An ignored token's logits (a padded position's may be NaN) are replaced, so nothing of them reaches the loss
    # or, through 0·NaN, the gradient; its target becomes class 0 for the gather.
    x = torch.where(ignored.unsqueeze(-1), 0.0, _upcast(logits))
    s = stablemax_s(x)
    index = torch.where(ignored, 0, target.long()).unsqueeze(-1)
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
    loss = torch.where(ignored, 0.0, loss)
    if reduction == "mean":
        return loss.sum() / (~ignored).sum().clamp_min(1)
    if reduction == "sum":
        return loss.sum()
    return loss


def _log_s(x: Tensor) -> Tensor:
    """log s(x) from log1p, exact where s(x) itself is subnormal or overflows."""
    return torch.log1p(x.clamp(min=0.0)) - torch.log1p(-x.clamp(max=0.0))


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
