"""Stable-SPAM: Adam fed with AdaClip-clipped, AdaGN-normalised gradients, with periodic momentum reset.

From Huang et al. (2025), "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam"
(arXiv 2502.17055).
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
from keel.optim._stable_spam_kernels import StableSpamPlan, foreach_update, tensor_major_update

_STATS = ("clip_ema", "norm_ema", "norm_rms_ema")
_STATE_KEYS = ("step", "norm_step", "exp_avg", "exp_avg_sq", *_STATS)


def momentum_decay_scale(step: int, *, decay_steps: int | None, decay_min: float) -> float:
    """Stable-SPAM's s_t: cosine from 1 at t = 0 to ``decay_min`` at t = decay_steps + 1, then held there.

    It multiplies β1 and γ1. The reference's cosine keeps going past the end and climbs back towards 1;
    keel holds the final value.
    """
    if decay_steps is None:
        return 1.0
    period = decay_steps + 1
    if step >= period:
        return decay_min
    return decay_min + (1.0 - decay_min) * 0.5 * (1.0 + math.cos(math.pi * step / period))


@optimizers.register("stable_spam")
class StableSPAM(BucketedOptimizer):
    """Adam fed with AdaClip-clipped and AdaGN-normalised gradients, with periodic momentum reset (MoRet).

    Use it where Adam's loss spikes or diverges at a learning rate you need, notably in low-precision
    (4-bit, bf16) training. Per parameter tensor and update t (1-based):

    1. decoupled weight decay first: p ← p·(1 − lr·weight_decay);
    2. AdaClip: M ← γ3·M + (1−γ3)·max|g|, M̂ = M/(1−γ3^t); entries with |g| > M̂ become g·M̂/max|g|;
    3. AdaGN: n = ‖g‖; m_n ← γ1'·m_n + (1−γ1')·n, v_n ← γ2·v_n + (1−γ2)·n²; after bias correction
       g ← g/n · m̂_n/(sqrt(v̂_n)+ε), so the gradient norm entering Adam is ≈ 1 and < 1 right after a spike
       (keel keeps r_n = sqrt(v_n), updated as hypot(sqrt(γ2)·r_n, sqrt(1−γ2)·n): v_n itself overflows float32
       once n ≳ 1.8e19);
    4. MoRet: every ``reset_interval`` updates Adam's m and v restart from zero (bias-correction count k ← 1);
    5. Adam with β1' = β1·s_t: p ← p − lr/(1−β1'^k) · m/(sqrt(v)/sqrt(1−β2^k) + ε).

    γ1' = γ1·s_t, where s_t is the optional cosine `momentum_decay_scale` (1 when ``decay_steps`` is None).
    The AdaClip/AdaGN statistics are 0-d float32 tensors per parameter. ``p.grad`` is left untouched.

    Speed: on accelerators the update runs as foreach kernels with the statistics as device vectors (no
    host sync). On CPU it runs tensor by tensor with the statistics as host floats (free to read there):
    max|g| and ‖g‖ (two read passes), the clip only where max|g| > M̂ (and then only on the rows that hold
    a spike), AdaGN's rescale into a scratch buffer, and PyTorch's fused AdamW kernel for decay, moments
    and step in one pass. One scratch buffer per parameter is kept between steps (4 bytes/parameter).

    Feed it finite gradients only (`keel.Guard` skips non-finite steps): a NaN would poison the running
    statistics. Finite gradients of any size are fine: ‖g‖ is computed scaled when its square would overflow
    (then the AdaGN statistics follow the float64 formula; norms beyond float32's range saturate at its max).
    As in the paper, M is updated before the clip, so a spike raises M̂ and is clipped to it, in proportion to
    its size: past a few hundred times the usual max|g|, a spike's size no longer changes the updates (a 1e25
    spike trains on exactly as a 1e4 one; before, its n² overflowed and the parameters became NaN).

    Parameters of any floating dtype work; float16 parameters keep float32 moments (`moment_dtype`: in float16
    Adam's second moment underflows), so their state takes 8 bytes per parameter.

    The reference's reset step, and keel's choice (``reset_like_reference=False``):
        In the official code the reset replaces m and v by zeros *after* taking references to the old
        tensors, so the reset step still updates with the old moments, but under k = 1 bias correction
        (≈ 0.3× a normal step for β = (0.9, 0.999)); the zeros take effect one step later. The same
        counter k also drives the bias corrections of AdaClip and AdaGN, whose statistics are *not*
        reset, so after every reset M̂ is re-inflated by 1/(1−γ3^k) (≈ 500× at k = 2) and clipping is off
        for hundreds of steps. keel follows the paper instead: the reset step is the first step of fresh
        moments (k = 1 on zeroed m, v) and AdaClip/AdaGN use their own never-reset count t.
        ``reset_like_reference=True`` reproduces the official code exactly.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (4-bit LLaMA-350M scripts: 4e-4; BF16 130M: 8e-4).
        betas: Adam's (β1, β2).
        eps: ε of both Adam and AdaGN.
        weight_decay: Decoupled weight decay, applied before the update.
        gamma1: Decay of the running gradient-norm mean (README and 4-bit scripts: 0.7; BF16: 0.85).
        gamma2: Decay of the running squared-norm mean (0.9; BF16 script 0.99999).
        gamma3: Decay of AdaClip's running max (0.999).
        reset_interval: Updates between momentum resets (constructor default 1000; 4-bit scripts 500);
            0 disables resets.
        decay_steps: Length of the cosine that decays β1 and γ1 (the reference's ``total_T``; README
            uses the run's total steps); None keeps s_t = 1.
        decay_min: Final value of that cosine (the reference's ``eta_min``, 0.5).
        reset_like_reference: Replay the official code's reset step (see above).
        foreach: None picks per device (tensor-major on CPU, foreach elsewhere); True or False forces it.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = StableSPAM(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Huang, Hu, Zhang, Jin, Li, Shen, Chen, Liu, Wen, Wang, Liu (2025), "Stable-SPAM: How to Train in
        4-Bit More Stably than 16-Bit Adam", arXiv 2502.17055. Official code: TianjinYellow/StableSPAM
        ``galore_torch/stablespam.py``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        reset_interval: int = 1000,
        decay_steps: int | None = None,
        decay_min: float = 0.5,
        reset_like_reference: bool = False,
        foreach: bool | None = None,
    ) -> None:
        name = "StableSPAM"
        check_adam(name, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
        for field, value in (("gamma1", gamma1), ("gamma2", gamma2), ("gamma3", gamma3)):
            check_range(name, field, value, 0.0, 1.0, high_open=True)
        check_int(name, "reset_interval", reset_interval)
        if decay_steps is not None:
            check_int(name, "decay_steps", decay_steps, low=1)
        check_range(name, "decay_min", decay_min, 0.0, 1.0)
        if not isinstance(reset_like_reference, bool):
            raise ValueError(f"{name}.reset_like_reference={reset_like_reference!r}; allowed: True or False")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            gamma1=gamma1,
            gamma2=gamma2,
            gamma3=gamma3,
            reset_interval=reset_interval,
            decay_steps=decay_steps,
            decay_min=decay_min,
            reset_like_reference=reset_like_reference,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        """``p``'s state, with every missing entry started: all of them at the first step; Stable-SPAM's own ones
        (t, AdaClip's and AdaGN's statistics) when Adam's came from ``torch.optim.AdamW``'s state dict (before:
        KeyError 'norm_step'), whose moments and count are kept."""
        state = self.state[p]
        if "norm_sq_ema" in state:  # a state saved by an older keel held v_n itself, which overflows float32
            state["norm_rms_ema"] = state.pop("norm_sq_ema").clamp_min(0.0).sqrt()
        if all(key in state for key in _STATE_KEYS):  # every step but the first: nothing to start
            upcast_moments(p, state)
            return state
        dtype = moment_dtype(p.dtype)
        if "step" not in state:
            state["step"] = torch.tensor(0.0)  # Adam's bias-correction count k (reset by MoRet)
        if "norm_step" not in state:
            state["norm_step"] = torch.tensor(0.0)  # t, never reset
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        for key in _STATS:
            if key not in state:
                state[key] = torch.zeros((), dtype=torch.float32, device=p.device)
        upcast_moments(p, state)
        return state

    def _update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        interval, like_reference = group["reset_interval"], group["reset_like_reference"]
        states = [self._init_state(p) for p in params]
        # CPU tensors, read in one go: no device sync.
        steps = [int(k) + 1 for k in torch.stack([s["step"] for s in states]).tolist()]
        norm_steps = [int(t) + 1 for t in torch.stack([s["norm_step"] for s in states]).tolist()]
        resets = [i for i, t in enumerate(norm_steps) if interval > 0 and t % interval == 0]
        plan = StableSpamPlan(
            # The reference drives the AdaClip/AdaGN bias corrections with Adam's (resettable) count,
            # read before this step's reset.
            counts=list(steps) if like_reference else norm_steps,
            steps=[1 if i in set(resets) else k for i, k in enumerate(steps)],
            scales=[
                momentum_decay_scale(t, decay_steps=group["decay_steps"], decay_min=group["decay_min"])
                for t in norm_steps
            ],
            resets=resets,
            reset_after=like_reference,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            gammas=(group["gamma1"], group["gamma2"], group["gamma3"]),
            weight_decay=group["weight_decay"],
        )
        foreach = group["foreach"] if group["foreach"] is not None else params[0].device.type != "cpu"
        (foreach_update if foreach else tensor_major_update)(params, states, plan, self._scratch)
        for state, k, t in zip(states, plan.steps, norm_steps, strict=True):
            state["step"].fill_(k)
            state["norm_step"].fill_(t)
