"""AdamW with weight decay independent of the peak learning rate (Wortsman et al. 2023).

From "Small-scale proxies for large-scale Transformer training instabilities" (arXiv 2309.14322), §3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from keel.optim._helpers import check_betas, check_lr, check_range, refuse_float16
from keel.optim._registry import optimizers


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
    overwritten at every step.

    float16 parameters are refused (ValueError): torch's AdamW keeps its moments in float16, where they
    underflow and the first step makes NaN. bfloat16, float32 and float64 work.

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
        # torch's AdamW fills missing keys from self.defaults, which already holds λ once __init__ is done.
        super().add_param_group(param_group)
        try:
            refuse_float16("IndependentAdamW", self.param_groups[-1:])
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
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
        group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        for group in self.param_groups:
            peak = float(group["initial_lr"])
            group["weight_decay"] = group["independent_weight_decay"] / peak if peak > 0 else 0.0
        return super().step(closure)
