"""The Adam moment update and parameter step shared by SPAM and Stable-SPAM: foreach kernels, and
PyTorch's fused AdamW kernel for the tensor-major CPU paths."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from keel.optim._helpers import Scratch, sqrt_into


def update_moments_(
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    inputs: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> None:
    """m ← β1·m + (1−β1)·g and v ← β2·v + (1−β2)·g², in place (three foreach kernels); g is read in the moments'
    dtype (float32 moments of float16 parameters, `moment_dtype`)."""
    inputs = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(inputs, exp_avgs, strict=True)]
    torch._foreach_lerp_(exp_avgs, inputs, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, inputs, inputs, 1.0 - beta2)


def apply_update_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    step_sizes: Sequence[float],
    eps: Sequence[float],
    scratch: Scratch,
    slot: int = 0,
) -> None:
    """p ← p + step_size·m / (sqrt(v) + eps), one signed step size and eps per tensor.

    Bias corrections are folded into the two scalars by the caller, so the denominator costs one sqrt
    and one add (``torch.optim.AdamW``'s foreach path spends an extra division on it). The denominator is in the
    moments' dtype, so float16 parameters with float32 moments divide in float32.
    """
    denom = sqrt_into(exp_avg_sqs, scratch, params, slot)
    torch._foreach_add_(denom, list(eps))
    torch._foreach_addcdiv_(params, exp_avgs, denom, list(step_sizes))


def fused_adamw_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
) -> None:
    """One AdamW update of one tensor in a single pass over p, g, m and v (``torch._fused_adamw_``).

    With k = ``step`` (a float32 0-d CPU tensor, read, not incremented)::

        p ← p·(1 − lr·weight_decay);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
        p ← p − lr/(1−β1^k) · m / (sqrt(v)/sqrt(1−β2^k) + eps)

    The unfused sequence (lerp, mul, addcmul, sqrt, add, addcdiv) makes seven passes over memory; on
    CPU, where the update is bandwidth-bound, the fused kernel measured 3–5× faster on a 10M-parameter
    model. ``g`` is only read. (The kernel's own ``grad_scale`` would rescale g on the fly, but it writes
    the rescaled values back into g, and keel leaves ``p.grad`` untouched.)

    The kernel takes one dtype: a float16 parameter with float32 moments (`moment_dtype`) is updated through a
    float32 copy of p and g, then rounded back.
    """
    if param.dtype != exp_avg.dtype:
        work = param.to(exp_avg.dtype)
        fused_adamw_(
            work,
            grad.to(exp_avg.dtype),
            exp_avg,
            exp_avg_sq,
            step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
        )
        param.copy_(work)
        return
    torch._fused_adamw_(
        [param],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [step],
        amsgrad=False,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
        grad_scale=None,
        found_inf=None,
    )
