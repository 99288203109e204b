"""Pure tensor functions for norms of many tensors at once, on device, without host syncs.

These are the statistics the gradient, parameter and update probes are built from. Tensors are grouped by
(device, dtype) and reduced with ``torch._foreach_norm`` — one fused kernel per group, the path
``torch.nn.utils.clip_grad_norm_`` uses — and accumulated in float32 whatever the input precision.

On a CPU there is no fused kernel: ``_foreach_norm`` runs a norm reduction per tensor. For float32 tensors that are
large on average (`one_by_one`), one BLAS dot product per tensor (the sum of squares, accumulated in float32 too, and
more exactly) reads them about a quarter faster: the large proxy's 37 gradient tensors (3.3M values) in 1.12 against
1.48 ms right after a backward (medians, interleaved, on the 2-core VM); with many small tensors the per-tensor Python
calls cost what the faster kernel saves.
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


# the mean number of elements from which a CPU group is reduced tensor by tensor: the large proxy's 37 tensors (89k
# on average) are, the small proxy's 21 (22k) are not (there the per-tensor calls cost what the kernels save)
ONE_BY_ONE_MEAN_NUMEL = 65_536


def one_by_one(tensors: Sequence[Tensor]) -> bool:
    """Whether ``tensors`` are float32 CPU tensors, contiguous and large enough on average that a reduction per tensor
    beats ``torch._foreach_*`` (which, on a CPU, loops over them in slower kernels)."""
    return sum(t.numel() for t in tensors) >= ONE_BY_ONE_MEAN_NUMEL * len(tensors) and all(
        t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


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
    if one_by_one(tensors):  # the sum of squares by one BLAS dot product each
        return torch.stack([torch.dot(t.view(-1), t.view(-1)) for t in tensors]).sqrt_()
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


def finiteness_witness(tensors: Sequence[Tensor]) -> Tensor:
    """One value (a 0-d float32 tensor on the first tensor's device) that is NaN or ±Inf when any element of
    ``tensors`` is — and, rarely, when finite values overflow float32 on the way, so a non-finite witness asks for an
    exact check and a finite one needs none. Its finite value means nothing else. The cheapest full read of many
    tensors that misses no non-finite element: the sum of per-tensor sums where `one_by_one` (the plain sum kernel
    reads fastest), else of their norms (``_foreach_norm``).

    Example:
        >>> finiteness_witness([torch.tensor([1.0, -3.0]), torch.ones(2)]).isfinite().item()
        True
        >>> finiteness_witness([torch.tensor([1.0, -float("inf")])]).isfinite().item()
        False
    """
    if not tensors:
        return torch.zeros(())
    if one_by_one(tensors):
        return torch.stack([t.sum() for t in tensors]).sum()
    return per_tensor_norms(tensors).sum()


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
