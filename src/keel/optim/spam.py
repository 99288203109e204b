"""SPAM: Adam with spike-aware clipping, periodic momentum reset and a cosine warm-up after each reset.

From Huang et al. (2025), "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training"
(arXiv 2501.06842, ICLR 2025).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from keel.optim._bucketed import BucketedOptimizer
from keel.optim._helpers import (
    check_adam,
    check_int,
    check_range,
    moment_dtype,
    upcast_moments,
)
from keel.optim._registry import optimizers
from keel.optim._spam_kernels import SpamPlan, foreach_update, has_unseen, tensor_major_update

_WARMUP_START = 0.99  # the reference's cosine starts at 0.99, so the first step after a reset is 1% of lr


def spam_warmup_scale(step: int, *, reset_interval: int, warmup_steps: int) -> float:
    """The LR multiplier of SPAM's cosine warm-up after each momentum reset, at 1-based update ``step``.

    ``1 − 0.99·(1 + cos(π·j/(warmup_steps + 1)))/2`` for the j-th step since the last reset (j = 0 on the
    reset step), 1 once ``j ≥ warmup_steps`` and before the first reset (the global LR schedule handles
    the very start of training).
    """
    if reset_interval <= 0 or warmup_steps <= 0 or step < reset_interval:
        return 1.0
    j = step % reset_interval
    if j >= warmup_steps:
        return 1.0
    return 1.0 - _WARMUP_START * 0.5 * (1.0 + math.cos(math.pi * j / (warmup_steps + 1)))


def spam_clips_at(step: int, *, threshold: float, reset_interval: int, grace_steps: int) -> bool:
    """Whether spike clipping is active at 1-based update ``step``: not in the first ``grace_steps``
    steps of training nor of each reset period, when v is still too close to zero to compare against."""
    if threshold == 0:
        return False
    if step < grace_steps:
        return False
    return reset_interval <= 0 or step % reset_interval >= grace_steps


@optimizers.register("spam")
class SPAM(BucketedOptimizer):
    """Adam with spike-aware clipping, periodic momentum reset and a cosine LR warm-up after each reset.

    Use it for LLM pre-training where occasional gradient spikes (up to 1000× the typical gradient)
    contaminate Adam's moments for thousands of steps. Per parameter tensor and update ``k`` (1-based):

    1. every ``reset_interval`` updates, m and v are zeroed; k is *not* reset, so the bias correction does
       not re-inflate the first steps after a reset;
    2. after ``grace_steps`` (and not in the first ``grace_steps`` of each period) entries with
       g² > threshold·v are clamped to sign(g)·sqrt(threshold·v), v being the second moment before this step;
    3. Adam: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², p ← p − lr·s·sqrt(1−β2^k)/(1−β1^k) · m/(sqrt(v)+ε),
       with s the warm-up multiplier from `spam_warmup_scale`;
    4. decoupled weight decay after the update: p ← p·(1 − lr·weight_decay).

    ``p.grad`` is left untouched (the reference clips it in place). Feed it finite gradients only
    (`keel.Guard` skips non-finite steps): a NaN entry is not a "spike" and passes through. Parameters of any
    floating dtype work; float16 parameters keep float32 moments (`moment_dtype`).

    Speed: on accelerators the update runs as foreach kernels. On CPU it runs tensor by tensor: a spike
    test on the host (most tensors have none, and the clamp's four passes are skipped), then PyTorch's
    fused AdamW kernel, one pass over p, g, m and v, with SPAM's step size, ε placement and decay-after
    folded into its scalars. Two scratch buffers per parameter are kept between steps (8 bytes/parameter
    in fp32) instead of allocating.

    Differences from the reference, on purpose:
        * Entries whose second moment is exactly 0 are not clipped (``clip_unseen=False``, see
          `spike_clip`); ``clip_unseen=True`` restores the reference. Which tensors hold such entries is
          checked once per reset period (one batched reduction, one host read), so the extra masking
          pass is only spent on those tensors (typically the input embedding).
        * The reset/grace/warm-up schedule is counted per parameter by its own update count k. The
          reference counts ``step()`` calls; the two agree whenever every parameter gets a gradient at
          every step.
        * ``reset_interval=0`` disables resets (the reference divides by it).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (README: 8e-4 for LLaMA-130M, 4e-4 for 350M).
        betas: Adam's (β1, β2).
        eps: Added to sqrt(v); the reference default is 1e-6.
        weight_decay: Decoupled weight decay, applied after the update.
        threshold: θ of the spike test g² > θ·v; 0 disables clipping.
        reset_interval: ΔT, updates between momentum resets; 0 disables resets.
        warmup_steps: Length of the cosine LR warm-up after each reset; 0 disables it.
        grace_steps: Updates after the start and after each reset during which nothing is clipped
            (the reference calls it ``grad_accu_steps``).
        clip_unseen: Clip entries whose second moment is exactly 0 to 0, as the reference does.
        foreach: None picks per device (tensor-major on CPU, foreach elsewhere); True or False forces it.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SPAM(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Huang, Zhu, Jin, Liu, Wang, Liu (2025), "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
        Training", arXiv 2501.06842. Official code: TianjinYellow/SPAM-Optimizer ``galore_torch/SPAM.py``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        threshold: float = 5000.0,
        reset_interval: int = 500,
        warmup_steps: int = 150,
        grace_steps: int = 20,
        clip_unseen: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_adam("SPAM", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
        check_range("SPAM", "threshold", threshold, 0.0, math.inf, high_open=True)
        check_int("SPAM", "reset_interval", reset_interval)
        check_int("SPAM", "warmup_steps", warmup_steps)
        check_int("SPAM", "grace_steps", grace_steps)
        if not isinstance(clip_unseen, bool):
            raise ValueError(f"SPAM.clip_unseen={clip_unseen!r}; allowed: True or False")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            threshold=threshold,
            reset_interval=reset_interval,
            warmup_steps=warmup_steps,
            grace_steps=grace_steps,
            clip_unseen=clip_unseen,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, threshold = group["lr"], group["threshold"]
        interval, grace = group["reset_interval"], group["grace_steps"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                dtype = moment_dtype(p.dtype)
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            else:
                upcast_moments(p, state)
        step_tensors = [s["step"] for s in states]
        torch._foreach_add_(step_tensors, 1.0)
        steps = [int(k) for k in torch.stack(step_tensors).tolist()]  # CPU tensors: no device sync
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]

        clip = [
            i
            for i, k in enumerate(steps)
            if params[i].numel() > 0
            and spam_clips_at(k, threshold=threshold, reset_interval=interval, grace_steps=grace)
        ]
        spare: set[int] = set()
        if clip and not group["clip_unseen"]:
            stale = [i for i in clip if "unseen" not in states[i] or _first_clip_step(steps[i], interval, grace)]
            for i, flag in zip(stale, has_unseen([exp_avg_sqs[i] for i in stale]), strict=True):
                states[i]["unseen"] = flag
            spare = {i for i in clip if states[i]["unseen"]}
        lrs = {
            k: lr * spam_warmup_scale(k, reset_interval=interval, warmup_steps=group["warmup_steps"])
            for k in set(steps)
        }
        bias2_sqrts = {k: math.sqrt(1.0 - beta2**k) for k in set(steps)}
        plan = SpamPlan(
            resets=[i for i, k in enumerate(steps) if interval > 0 and k % interval == 0],
            clip=clip,
            spare=spare,
            lrs=[lrs[k] for k in steps],
            bias2_sqrts=[bias2_sqrts[k] for k in steps],
            step_sizes=[-lrs[k] * bias2_sqrts[k] / (1.0 - beta1**k) for k in steps],
        )
        scalars = dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            decay=1.0 - lr * group["weight_decay"],
            threshold=threshold,
            scratch=self._scratch,
        )
        foreach = group["foreach"] if group["foreach"] is not None else params[0].device.type != "cpu"
        if foreach:
            foreach_update(params, exp_avgs, exp_avg_sqs, plan, **scalars)
        else:
            tensor_major_update(params, exp_avgs, exp_avg_sqs, plan, steps=step_tensors, **scalars)


def _first_clip_step(step: int, interval: int, grace: int) -> bool:
    """Is ``step`` the first update of its reset period at which clipping is active?"""
    start = (step // interval) * interval if interval > 0 else 0
    return step == max(start + grace, 1)
