"""The Adam moment update and parameter step shared by SPAM and Stable-SPAM, as foreach kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from keel.optim._helpers import Scratch, sqrt_into


def update_moments_(
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> None:
    """m ← β1·m + (1−β1)·g and v ← β2·v + (1−β2)·g², in place (three foreach kernels)."""
    torch._foreach_lerp_(exp_avgs, inputs, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, inputs, inputs, 1.0 - beta2)


def apply_update_(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step_sizes: Sequence[float],
    eps: Sequence[float],
    scratch: Scratch,
    slot: int = 0,
) -> None:
    """p ← p + step_size·m / (sqrt(v) + eps), one signed step size and eps per tensor.

    Bias corrections are folded into the two scalars by the caller, so the denominator costs one sqrt
    and one add (``torch.optim.AdamW``'s foreach path spends an extra division on it).
    """
    denom = sqrt_into(exp_avg_sqs, scratch, params, slot)
    torch._foreach_add_(denom, list(eps))
    torch._foreach_addcdiv_(params, exp_avgs, denom, list(step_sizes))
