"""Adam ε probe: the size of Adam's normalised update, and how much of it ε decides (ε-dominance).

| key                          | cadence             | cost                                                          |
|------------------------------|---------------------|---------------------------------------------------------------|
| `adam/update_rms`            | every `every` steps | three passes over the optimizer's moments (m, v)              |
| `adam/eps_dominated`         | as above            | free (same passes)                                            |
| `adam/eps_dominated/<param>` | as above; stored on `log_every` steps | one float per parameter tensor              |

Adam's update per element is m̂ / (√v̂ + ε). When the gradient's RMS shrinks towards ε — as models grow —
ε, not the gradient, sets the denominator and the update silently shrinks. Wortsman et al. (2023, §3.4)
track the RMS of this unscaled update (≈ 0.2–1 when healthy) and fix the collapse with a smaller ε
(1e-15). `adam/eps_dominated` is the share of elements with 0 < √v̂ < ε (elements whose v is exactly 0 never
had a gradient — unused embedding rows — and are left out: they are dead, not ε-dominated). Reads
``exp_avg``/``exp_avg_sq`` of ``torch.optim.Adam``/``AdamW`` (and optimizers with the same state names and a
numeric ``eps``: NAdam, RAdam, keel's SPAM and Stable-SPAM, ⊥Grad around any of them); others (SGD, Adagrad,
Adafactor) give no values. With Muon for the matrices and AdamW for the rest (``keel.watch(model, [adamw, muon])``,
nanochat's ``MuonAdamW`` groups) the values are the AdamW part's: Muon keeps no ``exp_avg_sq`` and its groups no
``betas``. Complex parameters count per real component. The moments read before
``optimizer.step()`` are those of the previous update.

References:
    Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities",
    arXiv 2309.14322 (no official code). Kingma & Ba 2015, "Adam", arXiv 1412.6980.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from keel._core import keys
from keel._core.validate import check_types, config_from
from keel.signals.attn_logits import due
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES


@dataclass(kw_only=True)
class AdamEpsConfig:
    """Settings of the Adam ε probe.

    Attributes:
        every: Cadence in steps.
    """

    every: int = 50

    def __post_init__(self) -> None:
        check_types(self)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"AdamEpsConfig.every={self.every!r}; allowed: an int >= 1")


def adam_update_stats(
    exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor | float, beta1: float, beta2: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(Σ u², elements with v > 0, count of 0 < √v̂ < ε) for u = m̂ / (√v̂ + ε), in float32.

    Example:
        >>> m, v = torch.tensor([0.1, 1e-3]), torch.tensor([0.01, 1e-20])
        >>> adam_update_stats(m, v, 1.0, 0.0, 0.0, 1e-8)[2]
        tensor(1.)
    """
    if exp_avg.is_complex():  # torch's Adam keeps complex moments for a complex parameter: per real component
        exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
    # a count of 0 (a momentum reset that restarted it) would divide by 1 − β⁰ = 0. A count kept on another device
    # than the moments (the CPU count of torch's AdamW without capturable/fused, and of keel's SPAM, on CUDA) is
    # read where it is: copying it over would be a host→device copy, a sync per tensor
    if isinstance(step, Tensor) and step.device == exp_avg.device:
        k: Tensor | float = step.float().clamp_min(1)
    else:
        k = max(float(step), 1.0)
    m_hat = exp_avg.float() / (1 - beta1**k)
    root_v = (exp_avg_sq.float() / (1 - beta2**k)).sqrt()
    update = m_hat / (root_v + eps)
    live = exp_avg_sq > 0
    return update.square().sum(), live.sum().float(), (live & (root_v < eps)).sum().float()


@PROBES.register("adam_eps")
class AdamEpsProbe:
    name = "adam_eps"

    def __init__(self, config: AdamEpsConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, AdamEpsConfig, config, fields)

    def measure(self, ctx: StepContext) -> Measurements:
        if not due(ctx.step, self.config.every):
            return {}
        hyper = {}
        for group in ctx.optimizer.param_groups:
            betas = group.get("betas")
            if betas is not None and isinstance(group.get("eps"), int | float):  # not Adafactor's (eps1, eps2)
                for p in group["params"]:
                    hyper[id(p)] = (float(betas[0]), float(betas[1]), float(group["eps"]))
        names, squares, counts, sizes, dominated = [], [], [], [], []
        with torch.no_grad():
            for name, p in zip(ctx.names, ctx.params, strict=True):
                state = ctx.optimizer.state.get(p, {})
                if id(p) not in hyper or "exp_avg" not in state or "exp_avg_sq" not in state:
                    continue
                sq, n, dom = adam_update_stats(
                    state["exp_avg"], state["exp_avg_sq"], state.get("step", 1.0), *hyper[id(p)]
                )
                names.append(name)
                squares.append(sq)
                counts.append(n)
                v = state["exp_avg_sq"]
                sizes.append(v.numel() * (2 if v.is_complex() else 1))  # real components, as adam_update_stats
                dominated.append(dom)
        if not names:
            return {}
        live = torch.stack(counts)
        return {
            keys.ADAM_UPDATE_RMS: (torch.stack(squares).sum() / sum(sizes)).sqrt(),
            keys.ADAM_EPS_DOMINATED: torch.stack(dominated).sum() / live.sum().clamp_min(1),
            keys.ADAM_EPS_DOMINATED_PER_PARAM: PerParam(tuple(names), torch.stack(dominated) / live.clamp_min(1)),
        }

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
