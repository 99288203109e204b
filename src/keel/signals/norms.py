"""Pure tensor functions for norms of many tensors at once, on device, without host syncs.

These are the statistics the gradient, parameter and update probes are built from. Tensors are grouped by
(device, dtype) and reduced with ``torch._foreach_norm`` — one fused kernel per group, the path
``torch.nn.utils.clip_grad_norm_`` uses — and accumulated in float32 whatever the input precision.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm or sum of ``dtype`` tensors accumulates in: float64 stays float64 (``vector_norm`` refuses
    to narrow it), every other floating dtype is summed in float32.

    Example:
        >>> accumulation_dtype(torch.bfloat16)
        torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norms(tensors: list[Tensor]) -> Tensor:
    """``_foreach_norm`` of one (device, dtype) group, as float32."""
    dtype = tensors[0].dtype
    if dtype.is_complex:  # the norm of a complex tensor is real; vector_norm takes no real accumulation dtype
        return torch.stack(torch._foreach_norm(tensors, 2)).float()
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=accumulation_dtype(dtype))).float()


def per_tensor_norms(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of each tensor, as one float32 vector on the first tensor's device.

    Accumulated in float32 (float64 tensors in float64, then rounded to float32; complex tensors: the norm of
    their magnitudes). A tensor holding NaN gives NaN; one holding ±Inf (and no NaN) gives Inf. An empty input
    gives an empty vector; an empty tensor a norm of 0.

    Example:
        >>> per_tensor_norms([torch.tensor([3.0, 4.0]), torch.zeros(2)])
        tensor([5., 0.])
    """
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    if len(groups) == 1:
        return _norms(list(tensors))
    out = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for indices in groups.values():
        out[torch.tensor(indices, device=device)] = _norms([tensors[i] for i in indices]).to(device)
    return out


def global_norm(norms: Tensor) -> Tensor:
    """The L2 norm of all tensors together, from their individual norms (a 0-d float32 tensor).

    Example:
        >>> global_norm(torch.tensor([3.0, 4.0]))
        tensor(5.)
    """
    return torch.linalg.vector_norm(norms.float(), 2)


def update_ratios(update_norms: Tensor, param_norms: Tensor, eps: float = 1e-12) -> Tensor:
    """‖Δθ‖ / ‖θ‖ per tensor: the relative size of an optimizer update (eps guards all-zero tensors).

    Example:
        >>> update_ratios(torch.tensor([1.0, 0.0]), torch.tensor([100.0, 0.0]))
        tensor([0.0100, 0.0000])
    """
    return update_norms / (param_norms + eps)
