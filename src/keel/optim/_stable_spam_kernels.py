"""Stable-SPAM's update kernels: foreach over all tensors (accelerators) and tensor-major (CPU).

Both apply the plan `StableSPAM` decided (counts, schedule, resets) and leave the new AdaClip/AdaGN
statistics in the state as 0-d float32 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from keel.optim._adam import apply_update_, fused_adamw_, update_moments_
from keel.optim._helpers import Scratch, accumulation_dtype, grads_of, max_abs, unit_scales
from keel.optim._rows import as_rows, hot_rows, row_abs_max, scale_spikes
from keel.optim.ada_clip import ada_clip_, ada_clip_thresholds

_TINY = torch.finfo(torch.float32).tiny
_FLOAT32_MAX = torch.finfo(torch.float32).max  # the statistics are float32: larger norms saturate here


@dataclass(frozen=True, kw_only=True)
class StableSpamPlan:
    """One bucket's step. ``steps``: Adam's count k per tensor (1 on a reset step); ``counts``: the count
    driving the AdaClip/AdaGN bias corrections; ``scales``: s_t; ``resets``: tensors that reset now;
    ``reset_after``: zero the moments after the update (the official code) instead of before."""

    steps: list[int]
    counts: list[int]
    scales: list[float]
    resets: list[int]
    reset_after: bool
    lr: float
    betas: tuple[float, float]
    eps: float
    gammas: tuple[float, float, float]
    weight_decay: float


def _adam_scalars(plan: StableSpamPlan, i: int) -> tuple[float, float, float]:
    """(β1', signed step size, ε') for tensor i.

    m/(sqrt(v)/sqrt(bc2) + ε) = sqrt(bc2)·m/(sqrt(v) + ε·sqrt(bc2)): one division per element saved.
    """
    beta1, beta2 = plan.betas
    beta1_t = beta1 * plan.scales[i]
    k = plan.steps[i]
    bc2_sqrt = math.sqrt(1.0 - beta2**k)
    return beta1_t, -plan.lr * bc2_sqrt / (1.0 - beta1_t**k), plan.eps * bc2_sqrt


def tensor_major_update(
    params: list[Tensor], states: list[dict[str, Any]], plan: StableSpamPlan, scratch: Scratch
) -> None:
    """Tensor by tensor, with the statistics as host floats, which on CPU cost nothing to read: two read
    passes over g (max|g|, then ‖g‖) and one fused AdamW pass (decay, moments, step) per tensor.

    AdaClip touches only the rows that hold a spike: their clipped values enter the norm, and those rows of
    p, m and v are updated again from their saved values with the clipped gradient after the dense update
    of the rest, so the result equals a dense clip's. When more than an eighth of the rows are hot, the
    dense clip runs.
    """
    gamma1, gamma2, gamma3 = plan.gammas
    grads = grads_of(params)
    maxima = torch.stack(max_abs(grads)).tolist()
    previous = {key: torch.stack([s[key] for s in states]).tolist() for key in ("clip_ema", "norm_ema", "norm_rms_ema")}
    updated: dict[str, list[float]] = {key: [] for key in previous}
    resets = set(plan.resets)
    outs = scratch.like(params, 1)
    for i, (p, g, state, out) in enumerate(zip(params, grads, states, outs, strict=True)):
        t = plan.counts[i]
        # AdaClip: dense, sparse (hot rows only) or not at all.
        ema = gamma3 * previous["clip_ema"][i] + (1.0 - gamma3) * maxima[i]
        threshold = ema / (1.0 - gamma3**t)
        src, hot = g, None
        acc = accumulation_dtype(g.dtype)
        squares_fit = maxima[i] * maxima[i] * g.numel() < torch.finfo(acc).max
        if maxima[i] > threshold:
            rows = _rows_if_writable(p, g, state) if squares_fit else None
            indices = hot_rows(row_abs_max(rows), threshold) if rows is not None else None
            if rows is None or indices is None:
                spiked = torch.abs(g, out=out).gt_(threshold)  # 1.0 where |g| > M̂
                src = torch.addcmul(g, g, spiked, value=threshold / maxima[i] - 1.0, out=out)
            else:
                hot = _HotRows(indices, rows, scale_spikes(rows.index_select(0, indices), threshold, maxima[i]))
        # AdaGN (the norm of the clipped gradient; with hot rows, the other rows' sum plus theirs).
        if hot is None and squares_fit:
            norm = torch.linalg.vector_norm(src, dtype=acc).item()
        elif hot is None:  # Σg² would overflow: the norm of src/max|g|, scaled back (a rare extra pass)
            norm = maxima[i] * torch.linalg.vector_norm(src.to(acc) / maxima[i], dtype=acc).item()
        else:
            row_sq = torch.linalg.vector_norm(hot.rows, dim=1, dtype=acc).square_()
            norm = math.sqrt(
                row_sq.index_fill_(0, hot.indices, 0.0).sum().item() + hot.clipped.float().square().sum().item()
            )
        g1 = gamma1 * plan.scales[i]
        saturated = min(norm, _FLOAT32_MAX)
        norm_ema = g1 * previous["norm_ema"][i] + (1.0 - g1) * saturated
        norm_rms_ema = math.hypot(math.sqrt(gamma2) * previous["norm_rms_ema"][i], math.sqrt(1.0 - gamma2) * saturated)
        target = (norm_ema / (1.0 - g1**t)) / (norm_rms_ema / math.sqrt(1.0 - gamma2**t) + plan.eps)
        factor = target / norm if norm > 0 else 0.0
        for key, value in (("clip_ema", ema), ("norm_ema", norm_ema), ("norm_rms_ema", norm_rms_ema)):
            updated[key].append(value)
        # AdaGN's rescale into scratch (p.grad stays untouched), then MoRet + Adam in one fused pass. Hot rows
        # were updated densely from the unclipped gradient: they are saved first and updated again from the
        # saved values with the clipped rows.
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if i in resets and not plan.reset_after:
            m.zero_()
            v.zero_()
        step = state["step"].fill_(plan.steps[i])
        adam = dict(
            lr=plan.lr,
            beta1=plan.betas[0] * plan.scales[i],
            beta2=plan.betas[1],
            eps=plan.eps,
            weight_decay=plan.weight_decay,
        )
        if hot is not None:
            saved = [as_rows(x).index_select(0, hot.indices) for x in (p, m, v)]
        fused_adamw_(p, torch.mul(src, factor, out=out), m, v, step, **adam)
        if hot is not None:
            fused_adamw_(saved[0], hot.clipped.mul_(factor), saved[1], saved[2], step, **adam)
            for x, rows_new in zip((p, m, v), saved, strict=True):
                as_rows(x).index_copy_(0, hot.indices, rows_new)
        if i in resets and plan.reset_after:
            m.zero_()
            v.zero_()
    for key, values in updated.items():
        for state, value in zip(states, torch.tensor(values, dtype=torch.float32).unbind(), strict=True):
            state[key] = value


class _HotRows(NamedTuple):
    """The rows of one gradient that hold a spike, for the sparse AdaClip of `tensor_major_update`."""

    indices: Tensor  # which rows
    rows: Tensor  # the whole gradient as rows (a view)
    clipped: Tensor  # those rows, clipped (a copy)


def _rows_if_writable(param: Tensor, grad: Tensor, state: dict[str, Any]) -> Tensor | None:
    """``grad`` as rows when the row-wise clip can write through views of it, of p and of its moments:
    at least 8 rows (fewer gain nothing) and contiguous p, gradient, m and v."""
    if grad.dim() < 2 or grad.shape[0] < 8:
        return None
    if not all(x.is_contiguous() for x in (param, grad, state["exp_avg"], state["exp_avg_sq"])):
        return None
    return as_rows(grad)


def foreach_update(params: list[Tensor], states: list[dict[str, Any]], plan: StableSpamPlan, scratch: Scratch) -> None:
    """All tensors op by op with foreach kernels and the statistics as device vectors: no host sync."""
    gamma1, gamma2, gamma3 = plan.gammas
    device = params[0].device
    grads = grads_of(params)
    if plan.weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - plan.lr * plan.weight_decay)
    # AdaClip, every tensor (deciding which need it would take a host read).
    maxima = torch.stack(max_abs(grads)).float()
    counts = torch.tensor(plan.counts, dtype=torch.float32, device=device)
    clip_ema, thresholds = ada_clip_thresholds(maxima, torch.stack([s["clip_ema"] for s in states]), counts, gamma3)
    outs = scratch.like(params, 1)
    # The clipped gradients come out scaled by 2^-⌊log2 max|g|⌋ (exact, same pass), so their Σg² cannot overflow.
    units = unit_scales(maxima)
    inputs = [
        ada_clip_(g, m, thr, out=out, times=u)
        for g, m, thr, out, u in zip(grads, maxima.unbind(), thresholds.unbind(), outs, units.unbind(), strict=True)
    ]
    # AdaGN: rescale each tensor to norm m̂_n/(r̂_n+ε).
    scaled_norms = torch.stack(torch._foreach_norm(inputs, 2, dtype=accumulation_dtype(inputs[0].dtype))).float()
    norms = (scaled_norms / units).clamp_max(_FLOAT32_MAX)
    g1 = torch.tensor([gamma1 * s for s in plan.scales], dtype=torch.float32, device=device)
    norm_ema = g1 * torch.stack([s["norm_ema"] for s in states]) + (1.0 - g1) * norms
    norm_rms_ema = torch.hypot(
        math.sqrt(gamma2) * torch.stack([s["norm_rms_ema"] for s in states]), math.sqrt(1.0 - gamma2) * norms
    )
    # Both statistics scaled by a power of two (exact) so that their bias corrections cannot overflow float32.
    down = unit_scales(torch.maximum(norm_ema, norm_rms_ema).clamp_min(1.0))
    target = (norm_ema * down / (1.0 - torch.pow(g1, counts))) / (
        norm_rms_ema * down / torch.sqrt(1.0 - torch.pow(gamma2, counts)) + plan.eps * down
    )
    factors = torch.where(scaled_norms > 0, target / scaled_norms.clamp_min(_TINY), 0.0)
    torch._foreach_mul_(inputs, [f.to(x.dtype) for f, x in zip(factors.unbind(), inputs, strict=True)])
    for state, m, n, r in zip(states, clip_ema.unbind(), norm_ema.unbind(), norm_rms_ema.unbind(), strict=True):
        state["clip_ema"], state["norm_ema"], state["norm_rms_ema"] = m, n, r
    # MoRet + Adam with β1' = β1·s_t (tensors grouped by β1', normally one group).
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    if plan.resets and not plan.reset_after:
        torch._foreach_zero_([exp_avgs[i] for i in plan.resets])
        torch._foreach_zero_([exp_avg_sqs[i] for i in plan.resets])
    scalars = [_adam_scalars(plan, i) for i in range(len(params))]
    by_beta1: dict[float, list[int]] = {}
    for i, (beta1_t, _, _) in enumerate(scalars):
        by_beta1.setdefault(beta1_t, []).append(i)
    for beta1_t, members in by_beta1.items():
        update_moments_(
            [exp_avgs[i] for i in members],
            [exp_avg_sqs[i] for i in members],
            [inputs[i] for i in members],
            beta1_t,
            plan.betas[1],
        )
    apply_update_(
        params,
        exp_avgs,
        exp_avg_sqs,
        step_sizes=[s for _, s, _ in scalars],
        eps=[e for _, _, e in scalars],
        scratch=scratch,
    )
    if plan.resets and plan.reset_after:
        torch._foreach_zero_([exp_avgs[i] for i in plan.resets])
        torch._foreach_zero_([exp_avg_sqs[i] for i in plan.resets])
