"""SPAM's update kernels: foreach over all tensors (accelerators) and tensor-major (CPU).

Both apply the same plan (which tensors reset, which are clip-tested, the step sizes) decided by `SPAM`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from keel.optim._adam import apply_update_, fused_adamw_, update_moments_
from keel.optim._helpers import Scratch, grads_of


@dataclass(frozen=True, kw_only=True)
class SpamPlan:
    """One bucket's step: per-tensor indices to reset, to clip-test (and of those, to test with unseen
    entries spared); per tensor its warmed-up LR lr·s, sqrt(1 − β2^k) and signed step size
    −lr·s·sqrt(1 − β2^k)/(1 − β1^k)."""

    resets: list[int]
    clip: list[int]
    spare: set[int]
    lrs: list[float]
    bias2_sqrts: list[float]
    step_sizes: list[float]


def spike_clip(
    grad: Tensor, exp_avg_sq: Tensor, threshold: float, *, out: Tensor, bound: Tensor, spare_unseen: bool
) -> Tensor:
    """SPAM's spike clipping of one tensor, written to ``out`` (``bound`` is scratch).

    Entries with g² > θ·v become sign(g)·sqrt(θ·v); that is, g is clamped to ±sqrt(θ·v).

    With ``spare_unseen``, entries whose v is exactly 0 — no gradient since the last reset — pass
    unchanged: there is no history to call them a spike against. The reference replaces them by
    sign(g)·0 = 0, so an entry that first gets a gradient after the grace period (a rare token's
    embedding row) cannot move until the next reset.
    """
    torch.mul(exp_avg_sq, threshold, out=bound).sqrt_()
    if spare_unseen:
        bound.masked_fill_(exp_avg_sq == 0, math.inf)
    if bound.dtype != grad.dtype:  # float32 moments of a float16 parameter: clamp takes one dtype
        bound = bound.to(grad.dtype)
    torch.neg(bound, out=out)
    return torch.clamp(grad, min=out, max=bound, out=out)


def may_spike(grad: Tensor, exp_avg_sq: Tensor, threshold: float, tmp: Tensor) -> bool:
    """Does any entry satisfy g² > θ·v (v − g²/θ < 0)? Exact up to rounding at the threshold itself.

    A host read: used on CPU only, where it is free and lets the usual spike-free tensor skip the
    four passes of the clamp.
    """
    return bool(torch.addcmul(exp_avg_sq, grad, grad, value=-1.0 / threshold, out=tmp).amin() < 0)


def has_unseen(exp_avg_sqs: list[Tensor]) -> list[bool]:
    """Per tensor: does v contain an exact 0? One batched reduction and one host read."""
    if not exp_avg_sqs:
        return []
    return [bool(f) for f in torch.stack([(v == 0).any() for v in exp_avg_sqs]).tolist()]


def foreach_update(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    plan: SpamPlan,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    decay: float,
    threshold: float,
    scratch: Scratch,
) -> None:
    """All tensors op by op with foreach kernels: few launches, the fast path on accelerators."""
    grads = grads_of(params)
    if plan.resets:
        torch._foreach_zero_([exp_avgs[i] for i in plan.resets])
        torch._foreach_zero_([exp_avg_sqs[i] for i in plan.resets])
    inputs = list(grads)
    clip = plan.clip
    if clip and params[0].device.type == "cpu":  # forced foreach on CPU: the host test is still free
        tmps = scratch.like([params[i] for i in clip], 0, [exp_avg_sqs[i].dtype for i in clip])
        clip = [
            i
            for i, tmp in zip(clip, tmps, strict=True)
            if i in plan.spare or may_spike(grads[i], exp_avg_sqs[i], threshold, tmp)
        ]
    owners = [params[i] for i in clip]
    bounds = scratch.like(owners, 0, [exp_avg_sqs[i].dtype for i in clip])  # in v's dtype, like the test on it
    for i, out, bound in zip(clip, scratch.like(owners, 1), bounds, strict=True):
        inputs[i] = spike_clip(grads[i], exp_avg_sqs[i], threshold, out=out, bound=bound, spare_unseen=i in plan.spare)
    update_moments_(exp_avgs, exp_avg_sqs, inputs, beta1, beta2)
    apply_update_(params, exp_avgs, exp_avg_sqs, step_sizes=plan.step_sizes, eps=[eps] * len(params), scratch=scratch)
    if decay != 1.0:
        torch._foreach_mul_(params, decay)


def tensor_major_update(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    plan: SpamPlan,
    *,
    steps: list[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    decay: float,
    threshold: float,
    scratch: Scratch,
) -> None:
    """Tensor by tensor: the spike test (and, rarely, the clamp), then one fused AdamW pass.

    SPAM's step is (p − lr·s·sqrt(1−β2^k)/(1−β1^k) · m/(sqrt(v) + ε))·d with the decay d after the update;
    the fused kernel computes p·(1 − lr'·λ') − lr'/(1−β1^k) · m/(sqrt(v)/sqrt(1−β2^k) + ε'), which is the
    same with lr' = lr·s·d, ε' = ε/sqrt(1−β2^k) and lr'·λ' = 1 − d.
    """
    resets, clip = set(plan.resets), set(plan.clip)
    tmps = scratch.like(params, 0, [v.dtype for v in exp_avg_sqs])  # the spike test's v − g²/θ, in v's dtype
    outs = scratch.like(params, 1)
    for i, (p, m, v, step, tmp, out) in enumerate(zip(params, exp_avgs, exp_avg_sqs, steps, tmps, outs, strict=True)):
        g = p.grad
        if i in resets:
            m.zero_()
            v.zero_()
        if i in clip and (i in plan.spare or may_spike(g, v, threshold, tmp)):
            g = spike_clip(g, v, threshold, out=out, bound=tmp, spare_unseen=i in plan.spare)
        lr = plan.lrs[i] * decay
        fused_adamw_(
            p,
            g,
            m,
            v,
            step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps / plan.bias2_sqrts[i],
            weight_decay=(1.0 - decay) / lr if lr != 0 else 0.0,
        )
        if lr == 0 and decay != 1.0:  # lr·s·d = 0 with d ≠ 1: d = 0, which the kernel cannot express
            p.mul_(decay)
