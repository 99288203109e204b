"""Private plumbing shared by keel's optimizers: argument checks, tensor grouping, scratch buffers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


def check_range(owner: str, name: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    """Raise ValueError naming ``owner.name``, the value and the allowed interval unless in range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{owner}.{name}={value!r}; allowed: a number in [{low}, {high}{bracket}")


def check_betas(owner: str, betas: Sequence[float]) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:  # a lone 0.9 raised "float has no len()"
        raise ValueError(f"{owner}.betas={betas!r}; allowed: a pair (beta1, beta2), each in [0, 1)")
    for i, beta in enumerate(betas):
        check_range(owner, f"betas[{i}]", beta, 0.0, 1.0, high_open=True)


def check_int(owner: str, name: str, value: int, low: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}.{name}={value!r}; allowed: an int >= {low}")


def check_lr(owner: str, lr: float) -> None:
    """A learning rate is a Python number here: keel's update rules fold it into per-tensor scalars."""
    check_range(owner, "lr", lr, 0.0, math.inf, high_open=True)


def check_adam(
    owner: str, *, lr: float, betas: Sequence[float], eps: float, weight_decay: float, foreach: bool | None
) -> None:
    """The checks every Adam-family optimizer of keel makes on its shared hyper-parameters."""
    check_lr(owner, lr)
    check_betas(owner, betas)
    check_range(owner, "eps", eps, 0.0, math.inf, high_open=True)
    check_range(owner, "weight_decay", weight_decay, 0.0, math.inf, high_open=True)
    if foreach not in (None, True, False):
        raise ValueError(f"{owner}.foreach={foreach!r}; allowed: None, True or False")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm or dot product of ``dtype`` tensors accumulates in: float64 stays float64 (``vector_norm``
    refuses to narrow it), everything else is summed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_scales(values: Tensor, *, at_inf: float = 1.0) -> Tensor:
    """Powers of two 2^-⌊log2 v⌋ that bring each finite positive value into [1, 2): multipliers that are exact, so
    scaling by them, computing, and scaling back changes no bit. 1 for 0 or NaN, ``at_inf`` for +inf; exponents
    stay within float32's normal range (±126)."""
    usable = torch.isfinite(values) & (values > 0)
    exponents = torch.where(usable, torch.floor(torch.log2(torch.where(usable, values, 1.0))), 0.0)
    exponents = torch.where(torch.isposinf(values), -math.log2(at_inf), exponents)
    return torch.exp2(-exponents.clamp(-126.0, 126.0))


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of Adam's moments for a parameter of ``dtype``: float32 for float16, the parameter's own otherwise.

    In float16, (1 − β2)·g² = 1e-3·g² underflows to 0 for |g| < 7.7e-3 while m does not, so m/(√v + ε) explodes
    (and ε = 1e-8 itself rounds to 0: 0/0). bfloat16 has float32's range and keeps its own dtype.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def upcast_moments(param: Tensor, state: dict[str, Any]) -> None:
    """float16 moments of a float16 parameter (a state saved by an older keel) become float32 (`moment_dtype`)."""
    dtype = moment_dtype(param.dtype)
    for key in ("exp_avg", "exp_avg_sq"):
        value = state.get(key)
        if dtype != param.dtype and isinstance(value, Tensor) and value.dtype == param.dtype:
            state[key] = value.to(dtype)


def restore_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of floating state to each parameter's dtype.

    That cast rounds the float32 moments of a float16 parameter and the float32 running statistics of a bf16 or
    float16 one (Stable-SPAM's AdaClip/AdaGN): a rollback would no longer continue bit for bit. Every state
    tensor saved in another dtype than the parameter's is put back exactly as saved (a copy, on the parameter's
    device).
    """
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in zip(saved_ids, params, strict=True):
        for key, value in state_dict["state"].get(index, {}).items():
            if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != p.dtype and key != "step":
                optimizer.state[p][key] = value.to(device=p.device, copy=True)  # never alias the caller's


def refuse_float16(owner: str, groups: Sequence[dict[str, Any]]) -> None:
    """Raise ValueError when parameter groups hold float16 parameters, for optimizers built on
    ``torch.optim.AdamW``'s kernels, which keep the moments in the parameters' dtype (`moment_dtype` says why
    that fails in float16)."""
    if any(p.dtype == torch.float16 for group in groups for p in group["params"]):
        raise ValueError(
            f"{owner}: float16 parameters; torch's AdamW keeps Adam's moments in float16, where 1e-3·g² "
            "underflows and ε rounds to 0, so the first step makes NaN. allowed: float32, bfloat16 or float64 "
            "parameters (train float16 with torch.autocast and a GradScaler), or keel.optim.SPAM / StableSPAM, "
            "which keep float32 moments for float16 parameters"
        )


def group_by_device_dtype(params: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``params`` bucketed by (device, dtype), the unit a foreach kernel can take at once."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return buckets


def max_abs(tensors: list[Tensor]) -> list[Tensor]:
    """max |x| of each tensor as 0-d tensors (0 for empty tensors), without a host sync.

    On CUDA ``_foreach_norm(ord=inf)`` is one fused kernel. On CPU that path is ~10× slower than a
    per-tensor ``aminmax`` (one read, no temporary), so CPU tensors take the loop.
    """
    if not tensors:
        return []
    if tensors[0].device.type != "cpu":
        return list(torch._foreach_norm(tensors, math.inf))
    lows, highs = [], []
    for t in tensors:
        low, high = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
        lows.append(low)
        highs.append(high)
    return list(torch.maximum(torch.stack(lows).neg_(), torch.stack(highs)).unbind())


class Scratch:
    """One reusable scratch tensor per parameter, for optimizers that need per-step temporaries.

    On CPU every fresh multi-megabyte temporary costs page faults on first touch, which made a plain
    ``torch._foreach_sqrt`` several times slower than writing into an existing buffer; the buffers are
    therefore kept between steps (4 bytes/parameter for fp32, not saved in ``state_dict``). On
    accelerators the caching allocator already reuses memory, so buffers are allocated per step.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, list[Tensor]] = {}

    def like(
        self, tensors: Sequence[Tensor], slot: int = 0, dtypes: Sequence[torch.dtype] | None = None
    ) -> list[Tensor]:
        """Scratch tensors shaped like ``tensors`` (in ``dtypes``, default theirs); ``slot`` selects an independent
        set of buffers."""
        out = []
        for i, t in enumerate(tensors):
            dtype = t.dtype if dtypes is None else dtypes[i]
            if t.device.type != "cpu":
                out.append(torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format))
                continue
            kept = self._buffers.setdefault(id(t), [])
            while len(kept) <= slot:
                kept.append(torch.empty(0, dtype=dtype))
            if kept[slot].shape != t.shape or kept[slot].dtype != dtype:
                kept[slot] = torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)
            out.append(kept[slot])
        return out

    def clear(self) -> None:
        self._buffers.clear()


def sqrt_into(sources: list[Tensor], scratch: Scratch, owners: Sequence[Tensor], slot: int = 0) -> list[Tensor]:
    """``sqrt`` of each source, in the source's dtype: into ``scratch`` buffers on CPU, one fused foreach kernel
    elsewhere."""
    if not sources:
        return []
    if sources[0].device.type != "cpu":
        return list(torch._foreach_sqrt(sources))
    out = scratch.like(owners, slot, [src.dtype for src in sources])
    for src, dst in zip(sources, out, strict=True):
        torch.sqrt(src, out=dst)
    return out


def params_with_grad(group: dict, owner: str) -> list[Tensor]:
    """The group's parameters that received a gradient.

    Raises:
        ValueError: A sparse gradient or a complex parameter (keel's update rules are for dense, real tensors),
            named with its shape; nothing is updated.
    """
    return [p for p in group["params"] if p.grad is not None and dense_real(owner, p)]


def dense_real(owner: str, p: Tensor) -> bool:
    """True for a parameter with a dense gradient and real values; else the one ValueError naming ``owner``."""
    if p.grad is not None and p.grad.layout != torch.strided:  # sparse COO (nn.Embedding(sparse=True)), CSR, ...
        raise ValueError(
            f"{owner}: a sparse gradient ({p.grad.layout}) for a parameter of shape {tuple(p.shape)}; allowed: "
            "dense gradients (nn.Embedding(sparse=False); torch.optim.SparseAdam takes sparse ones)"
        )
    if p.is_complex():
        raise ValueError(
            f"{owner}: a {p.dtype} parameter of shape {tuple(p.shape)}; allowed: real floating-point "
            "parameters (torch.view_as_real(p) is one; torch.optim.AdamW takes complex ones)"
        )
    return True


def grads_of(params: Sequence[Tensor]) -> list[Tensor]:
    """The gradients of ``params``, which were chosen for having one (`params_with_grad`)."""
    grads = [g for p in params if (g := p.grad) is not None]
    if len(grads) != len(params):
        raise RuntimeError("a parameter lost its gradient between the optimizer's choice and its update")
    return grads


def step_buckets(
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], float] | None,
    update: Callable[[list[Tensor], dict[str, Any]], None],
) -> float | None:
    """The body of an optimizer's ``step``: evaluate ``closure`` with grad enabled, then call
    ``update(params, group)`` once per parameter group and (device, dtype) bucket of parameters with a
    gradient — the unit one foreach or fused kernel takes. Returns the closure's loss, if any."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    params_by_group = [params_with_grad(group, type(optimizer).__name__) for group in optimizer.param_groups]
    for group, params in zip(optimizer.param_groups, params_by_group, strict=True):
        for indices in group_by_device_dtype(params).values():
            update([params[i] for i in indices], group)
    return loss


def as_list(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values]
