"""The weights checked finite right after each applied update, under ``policy="recover"``.

keel finds non-finite parameters at its *next* step, from that step's non-finite loss or gradient norm, and rolls
back then. Between the two, the loop runs on the broken weights, and some loops raise there before keel's next step:
a REINFORCE rollout's ``Categorical(probs)`` refuses NaN probabilities (pytorch/examples' reinforce.py, an update that
leaves an Inf weight: "Expected parameter probs … found invalid values"), TRL's generation its ``multinomial``, a VAE's
BCE its NaN input. So after an applied update the trainable parameters are read once into one value that is not
finite when any of them holds NaN/Inf (`keel.signals.norms.finiteness_witness`), brought to the host once; when it is
not finite, the parameters holding NaN/Inf are named (``torch.isfinite`` on each, on that rare step only: finite
parameters whose float32 sum overflowed are not among them) and `Guard.step` rolls back inside the same call, so the
loop's next forward sees the restored weights.

Cost: one read of the parameters per update (a fraction of what the optimizer's own step reads and writes) and one
device→host copy; under ``torch.distributed`` one all-reduce of a flag, so every rank rolls back together.

Updates proven finite are not read (``RecoveryConfig(check_weights="unproven")``, the default). From finite gradients
on finite weights, torch.optim's Adam, AdamW and SGD cannot write NaN/Inf (`update_proven_finite` bounds each
element's update), so their weights are read only after the first update, after each one a snapshot follows (no
snapshot holds broken weights) and after those the proof does not cover: other optimizers (matrix roots and Newton
iterations — Shampoo, SOAP, Muon — can turn finite gradients into NaN), float16 weights, step hooks, settings outside
the bounds, and every update under ``torch.distributed`` (the check is a collective each rank must enter alike, and a
hook on one rank would split them). What it gives up: a NaN the loop writes into a weight between its backward and
the update is found at the next snapshot, or when the next forward uses the weight (a non-finite loss: a rollback),
not before that forward; ``check_weights="every_update"`` reads after every update. Measured: the read was 2–2.5 % of
a step on the 2-core CPU's proxies (BENCHMARKS.md, session 17), and on a GPU it is a second host sync per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer

from keel._core import keys
from keel._core.finding import Finding
from keel.guard.distributed import RankSync
from keel.signals.norms import finiteness_witness

MAX_NAMED = 20  # parameters named in the finding; ``count`` covers the rest (the non-finite detector's limit)

# the optimizers whose update `update_proven_finite` bounds: these exact types (a subclass may change the update)
PROVEN_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
# weights an update within the bounds cannot overflow (float16's range ends at 65504)
PROVEN_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16})
MAX_LR = 1e6  # bounds of the proof, far outside any recipe
MIN_EPS = 1e-30
MAX_MOMENTUM = 0.999
MIN_BETA2 = 1e-3  # v may hold Inf (the square of g + λθ, Adam's coupled decay, past float32): β₂·Inf must stay Inf


def non_finite_parameters(names: Sequence[str], params: Sequence[Tensor], ranks: RankSync | None) -> list[str]:
    """The names of the parameters holding NaN or ±Inf ([] when every one is finite, on every rank).

    One fused norm read and one host copy when all are finite; on ranks (``ranks``), a flag all-reduced, so that every
    rank answers alike (another rank's broken shard gives this rank ``["another rank's parameters"]``).
    """
    if not params:
        return []
    with torch.no_grad():  # a finite total: every element is; a non-finite one is checked parameter by parameter
        all_finite = math.isfinite(finiteness_witness(params).item())
        broken = [] if all_finite else [n for n, p in zip(names, params, strict=True) if not _finite(p)]
    if ranks is not None and ranks.all_max([float(bool(broken))])[0] > 0 and not broken:
        return ["another rank's parameters"]
    return broken


def update_proven_finite(
    optimizer: torch.optim.Optimizer, dtypes: set[torch.dtype], lr_scales: Sequence[float]
) -> bool:
    """Whether ``optimizer.step()`` provably leaves finite weights of ``dtypes`` finite, given finite gradients (keel
    measured their norm finite, so each squared element is finite in float32) and ``lr_scales`` on the groups' LRs.

    Adam/AdamW: m and v are running averages of finite values, so finite; with β₁² ≤ β₂, Cauchy–Schwarz keeps
    |m̂|/√v̂ below (1-β₁)/√(1-β₂) times the square root of the step count (a constant when β₁² < β₂), and where v
    has underflowed to 0 so has m, to below 3e-23, so |m̂|/(√v̂ + ε) ≤ 3e-23/ε. Where v is Inf (Adam's coupled decay
    squares g + λθ, which a large weight takes past float32) the ratio is 0 as long as β₂ > 0 keeps β₂·Inf from
    being NaN, hence β₂ ≥ 1e-3. So with lr ≤ 1e6, ε ≥ 1e-30,
    0 ≤ λ ≤ 1 and lr·λ ≤ 1, lr times that, plus the decay lr·λ·θ, is far inside float32's range. SGD: the momentum
    buffer is at most max|g + λθ|·(1-dampening)/(1-μ), so with μ ≤ 0.999, lr·(g + λθ + μ·buffer) is too. Left
    out on purpose: weights above about 1e33 (with SGD's momentum a step may multiply one by up to 1000): their
    forward overflowed long before. Step hooks (the optimizer's or torch's global ones) may write anything, so none
    may be registered.

    Example:
        >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
        >>> update_proven_finite(opt, {torch.float32}, [1.0]), update_proven_finite(opt, {torch.float16}, [1.0])
        (True, False)
    """
    if type(optimizer) not in PROVEN_OPTIMIZERS or not dtypes <= PROVEN_DTYPES or _has_step_hooks(optimizer):
        return False
    groups = optimizer.param_groups
    if len(lr_scales) != len(groups):
        return False
    sgd = type(optimizer) is torch.optim.SGD
    return all(_group_bounded(g, float(g["lr"]) * s, sgd) for g, s in zip(groups, lr_scales, strict=True))


def _group_bounded(group: dict, lr: float, sgd: bool) -> bool:
    decay = float(group.get("weight_decay", 0.0))
    if not (0.0 <= lr <= MAX_LR and 0.0 <= decay <= 1.0 and lr * decay <= 1.0):
        return False
    if sgd:
        momentum, dampening = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
        return 0.0 <= momentum <= MAX_MOMENTUM and 0.0 <= dampening <= 1.0
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    return 0.0 <= beta1 < 1.0 and MIN_BETA2 <= beta2 < 1.0 and beta1 * beta1 <= beta2 and MIN_EPS <= eps < math.inf


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    return bool(
        getattr(optimizer, "_optimizer_step_pre_hooks", None)
        or getattr(optimizer, "_optimizer_step_post_hooks", None)
        or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
        or getattr(torch_optimizer, "_global_optimizer_post_hooks", None)
    )


def broken_update_finding(step: int, broken: list[str]) -> Finding:
    """The critical finding for an update of ``step`` that left the parameters ``broken`` non-finite: the kind and
    signal of the non-finite detector's finding on parameters (the escalation ladder rolls back on it), found one step
    sooner; its onset is the state step ``step + 1`` would have started from."""
    where = ", ".join(broken[:5]) + (" …" if len(broken) > 5 else "")
    return Finding(
        step=step,
        kind="non_finite",
        severity="critical",
        signal=keys.PARAM_NORM,
        value=float("nan"),
        evidence={
            "non_finite": [keys.PARAM_NORM],
            "parameters": broken[:MAX_NAMED],
            "count": len(broken),
            "after_update": True,
            "onset_step": step + 1,
        },
        cause=(
            f"NaN/Inf in parameters ({where}) right after the update of step {step}, whose loss and gradients were "
            "finite: the update overflowed (an LR far too high for this step, an optimizer state that blew up), or the "
            "loop wrote them since the last check (an in-place weight write such as a renorm of a zero row, an adapter "
            "merge, a checkpoint or callback that loaded bad values)."
        ),
        advice=(
            "keel rolled back before the loop's next forward (a rollout or generation from these weights would raise "
            "or sample garbage). If the loop writes into these parameters between steps, check that write; else lower "
            "the learning rate and look at the optimizer's state for the named parameters."
        ),
    )


def _finite(param: Tensor) -> bool:
    return bool(torch.isfinite(param).all())
