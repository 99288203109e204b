"""Private argument checks and masked reductions shared by the preference and policy-gradient losses.

Each check raises one ValueError naming the argument, its value (or shape) and what is allowed. Tensor *values*
are never inspected here: a finiteness check would cost a device→host sync every step, so NaN and ±Inf in a
loss's inputs propagate to its output, where keel's Guard records the non-finite loss and skips the step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AGGREGATIONS = ("token", "sequence")


def is_int(value: object) -> bool:
    """An int, not a bool (``True`` is an int to Python; as a size or a count it is a mistake)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """Return ``value`` as a float, or raise ValueError unless it is a finite number in the interval."""
    ok = is_number(value) and (value > low if low_open else value >= low) and value <= high  # type: ignore[operator]
    if not ok:
        left = "(" if low_open else "["
        right = "]" if math.isfinite(high) else ")"
        raise ValueError(f"{name}={value!r}; allowed: a finite number in {left}{low}, {high}{right}")
    return float(value)  # type: ignore[arg-type]


def check_floating(name: str, tensor: object, *, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Raise ValueError unless ``tensor`` is a floating-point tensor (with ``dim`` dimensions, when given)."""
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        got = f"a {tensor.dtype} tensor" if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"{name} is {got}; allowed: a floating-point tensor")
    dims = (dim,) if isinstance(dim, int) else dim
    if dims is not None and tensor.dim() not in dims:
        wanted = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name}.shape={tuple(tensor.shape)}; allowed: a {wanted}-d tensor")
    return tensor


def check_shape(name: str, tensor: Tensor, like_name: str, like: Tensor) -> None:
    """Raise ValueError unless ``tensor`` has exactly ``like``'s shape."""
    if tensor.shape != like.shape:
        raise ValueError(f"{name}.shape={tuple(tensor.shape)}; allowed: {like_name}'s shape {tuple(like.shape)}")


def check_nonempty(name: str, tensor: Tensor) -> None:
    """Raise ValueError for a tensor with no elements: a loss over nothing is a caller's bug, not a 0."""
    if tensor.numel() == 0:
        raise ValueError(f"{name}.shape={tuple(tensor.shape)} is empty; allowed: at least one element")


def check_mask(mask: object, like_name: str, like: Tensor) -> Tensor | None:
    """Validate an optional token mask of ``like``'s shape: bool, or numbers where nonzero selects; None selects all."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask is {type(mask).__name__}; allowed: None or a tensor of {like_name}'s shape")
    check_shape("mask", mask, like_name, like)
    return mask


def check_aggregation(aggregation: object) -> str:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}; allowed: one of {AGGREGATIONS}")
    return aggregation  # type: ignore[return-value]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: half-precision log-probs are reduced in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _selected(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``values`` with unselected positions set to 0 (so NaN/Inf padding cannot leak in) and the 0/1 weights."""
    keep = mask if mask.dtype == torch.bool else mask != 0
    return values.masked_fill(~keep, 0.0), keep.to(values.dtype)


def masked_token_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Σ values over selected positions / their count; 0 (not NaN) when the mask selects nothing."""
    if mask is None:
        return values.mean()
    values, weights = _selected(values, mask)
    return values.sum() / weights.sum().clamp_min(1.0)


def aggregate(per_token: Tensor, mask: Tensor | None, aggregation: str) -> Tensor:
    """Reduce a ``(batch, tokens)`` tensor to a 0-d loss.

    ``"token"``: Σ over all active tokens / number of active tokens (DAPO Eq. 12; TRL ``loss_type="dapo"`` /
    ``"bnpo"`` on one micro-batch; verl ``token-mean``), so long responses weigh in proportion to their length.
    ``"sequence"``: the mean over sequences of each sequence's token mean (GRPO's original; TRL ``"grpo"``);
    a sequence with no active token contributes 0, as in TRL (its count is clamped to 1).
    """
    if aggregation == "token":
        return masked_token_mean(per_token, mask)
    if mask is None:
        return per_token.mean(dim=-1).mean()
    values, weights = _selected(per_token, mask)
    return (values.sum(dim=-1) / weights.sum(dim=-1).clamp_min(1.0)).mean()
