"""AdamW with weight decay independent of the peak learning rate (Wortsman et al. 2023).

From "Small-scale proxies for large-scale Transformer training instabilities" (arXiv 2309.14322), §3.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, overload

import torch
from torch import Tensor

from keel._core.errors import KeelWarning
from keel.optim._adam import fused_adamw_
from keel.optim._helpers import check_betas, check_lr, check_range, moment_dtype, restore_state_dtypes
from keel.optim._registry import optimizers

LARGE_DECAY = 0.01  # λ above this per step is warned about: AdamW's coupled weight_decay passed as it is


@optimizers.register("independent_adamw")
class IndependentAdamW(torch.optim.AdamW):
    """AdamW whose decay per step is ``schedule_multiplier · λ``, not ``lr · λ``.

    Use it for learning-rate sweeps and for any run whose peak LR may change: with the usual decoupled
    decay (p ← p − lr·λ·p) the decay strength moves with the swept LR, so high-LR runs are over-decayed
    and low-LR runs barely decay. Wortsman et al. decay by p ← p − s_t·λ·p, s_t = lr_t / peak_lr being the
    schedule's multiplier, which lowers LR sensitivity.

    It *is* ``torch.optim.AdamW`` (same state, foreach/fused kernels, state_dict format): before each step
    the decay handed to AdamW is set to λ / peak_lr, since AdamW applies p·(1 − lr_t·wd) and
    lr_t·λ/peak_lr = s_t·λ. The peak LR is the group's ``initial_lr`` — the key LR schedulers record —
    set from ``lr`` at construction when no scheduler has set it yet.

    Each group holds λ as ``independent_weight_decay``; its ``weight_decay`` entry is derived from it and
    overwritten at every step. A group given with its own ``weight_decay`` (nanoGPT's ``configure_optimizers``:
    ``{"weight_decay": 0.0}`` for biases and norm gains) has that λ; ``independent_weight_decay`` in a group wins.
    λ is a decay *per step*: a λ above 0.01 (AdamW's coupled ``weight_decay=0.1`` passed as it is) is warned
    about once, as it shrinks the weights by more than 1 % every step — AdamW's ``wd`` at peak LR η decays as
    λ = η·wd. A loop that writes ``param_group["lr"]`` itself (nanoGPT's ``get_lr``) builds it with ``lr=`` the
    schedule's peak (or sets each group's ``initial_lr``); an LR above the peak is warned about once.

    float16 parameters keep float32 moments and are updated through a float32 copy (torch's AdamW would keep
    float16 moments, where 1e-3·g² underflows and ε rounds to 0, so its first step makes NaN); their state then
    differs from torch's AdamW only in that dtype. ``amsgrad`` and ``maximize`` are refused with float16
    parameters. bfloat16, float32 and float64 parameters go through torch's own kernels unchanged.

    Args:
        params: Parameters or parameter groups.
        lr: Peak learning rate.
        betas: Adam's (β1, β2); Wortsman et al. use (0.9, 0.95).
        eps: Adam's ε (1e-8 in the paper, which also suggests far smaller values for large models).
        weight_decay: λ, the independent decay per step at schedule multiplier 1. The paper's
            recommendation (1e-4) is recorded from secondary notes and not yet checked against the paper.
        **kwargs: Passed to ``torch.optim.AdamW`` (``foreach``, ``fused``, ``amsgrad``, ``maximize`` ...).

    Example:
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = IndependentAdamW([p], lr=10.0, weight_decay=0.1)
        >>> p.grad = torch.zeros(3)
        >>> opt.step()
        >>> p.data  # decayed by 1 − 0.1, whatever the LR
        tensor([0.9000, 0.9000, 0.9000])

    References:
        Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities",
        arXiv 2309.14322. No official code; Loshchilov & Hutter (2019), arXiv 1711.05101, for the
        decoupled form it modifies.
    """

    # Each warning once per optimizer. Class-level defaults, so that a deepcopied or unpickled optimizer, which
    # ``Optimizer.__getstate__`` rebuilds from defaults, state and groups only, still has them.
    _warned_large_decay = False
    _warned_above_peak = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        check_lr("IndependentAdamW", lr)
        check_betas("IndependentAdamW", betas)
        check_range("IndependentAdamW", "eps", eps, 0.0, math.inf, high_open=True)
        check_range("IndependentAdamW", "weight_decay", weight_decay, 0.0, math.inf, high_open=True)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, **kwargs)
        self.defaults["independent_weight_decay"] = weight_decay
        for group in self.param_groups:
            self._prepare_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group's own weight_decay is its λ; read before torch fills the missing keys from self.defaults (which
        # holds weight_decay=0.0 for AdamW, and λ once __init__ is done)
        if "weight_decay" in param_group and "independent_weight_decay" not in param_group:
            param_group = {**param_group, "independent_weight_decay": param_group["weight_decay"]}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        flags = [k for k in ("amsgrad", "maximize") if group.get(k)]
        if flags and any(p.dtype == torch.float16 for p in group["params"]):
            self.param_groups.pop()  # leave the optimizer as it was
            raise ValueError(
                f"IndependentAdamW: float16 parameters with {'=True, '.join(flags)}=True; allowed: "
                "float16 parameters with amsgrad=False and maximize=False, or float32/bfloat16 ones"
            )
        if "independent_weight_decay" in self.defaults:
            self._prepare_group(self.param_groups[-1])

    def _prepare_group(self, group: dict[str, Any]) -> None:
        group.setdefault("independent_weight_decay", self.defaults["independent_weight_decay"])
        check_range(
            "IndependentAdamW",
            "independent_weight_decay",
            group["independent_weight_decay"],
            0.0,
            math.inf,
            high_open=True,
        )
        if group["independent_weight_decay"] > LARGE_DECAY and not self._warned_large_decay:
            self._warned_large_decay = True
            warnings.warn(
                f"IndependentAdamW: weight_decay={group['independent_weight_decay']!r} shrinks the weights by "
                f"{group['independent_weight_decay']:.0%} every step: λ is the decay per step at the schedule's "
                "peak, not AdamW's coupled weight_decay (AdamW's wd at peak LR η decays as λ = η·wd, e.g. "
                "6e-4 × 0.1 = 6e-5; Wortsman et al. use 1e-4)",
                KeelWarning,
                stacklevel=3,
            )
        group.setdefault("initial_lr", group["lr"])

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            peak = float(group["initial_lr"])
            lr = group["lr"]  # (a tensor LR, capturable on a device, is not read back: no host sync per step)
            if not isinstance(lr, Tensor) and lr > peak and group["independent_weight_decay"] > 0:
                self._warn_above_peak(float(lr), peak)
            group["weight_decay"] = group["independent_weight_decay"] / peak if peak > 0 else 0.0
        half = [
            (group, p, p.grad)
            for group in self.param_groups
            for p in group["params"]
            if p.dtype == torch.float16 and p.grad is not None
        ]
        for _, p, _ in half:
            p.grad = None  # hidden from torch's AdamW, which would give them float16 moments
        try:
            super().step()
        finally:
            for _, p, grad in half:
                p.grad = grad
        for group, p, grad in half:
            self._step_float16(group, p, grad)
        return loss

    def _warn_above_peak(self, lr: float, peak: float) -> None:
        """Once: an LR above the group's peak (``initial_lr``), as a loop that writes ``param_group["lr"]`` itself
        gives when the optimizer was built with a placeholder LR; the decay then follows the wrong peak (none at
        all for a peak of 0)."""
        if self._warned_above_peak:
            return
        self._warned_above_peak = True
        warnings.warn(
            f"IndependentAdamW: lr={lr:g} is above the group's peak LR initial_lr={peak:g}, by which the decay is "
            "scaled (λ·lr/peak; none for a peak of 0): build it with lr= the schedule's peak, or set each group's "
            "'initial_lr' to it, when the loop writes param_group['lr'] itself",
            KeelWarning,
            stacklevel=3,
        )

    def _step_float16(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        """AdamW's update of one float16 parameter with float32 moments (`moment_dtype`)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype(p.dtype), memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] += 1
        beta1, beta2 = group["betas"]
        fused_adamw_(
            p,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state; one saved by ``torch.optim.AdamW`` (a run switching to this optimizer) keeps each group's λ
        and peak LR from this optimizer, as its groups hold neither (the first step raised KeyError 'initial_lr')."""
        own = [{k: g[k] for k in ("independent_weight_decay", "initial_lr") if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, kept in zip(self.param_groups, own, strict=True):
            for key, value in kept.items():
                group.setdefault(key, value)
        restore_state_dtypes(self, state_dict)  # float16 parameters' float32 moments, exactly as saved
