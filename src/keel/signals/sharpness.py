"""Sharpness probe: top Hessian eigenvalue and trace, and the stability margin they imply for the current LR.

| key                                  | cadence                            | cost                             |
|--------------------------------------|------------------------------------|----------------------------------|
| `curvature/sharpness`                | every `every` steps, on an LR jump | forward + backward, `iters` HVPs |
| `curvature/trace`                    | as above                           | `trace_probes` more HVPs         |
| `curvature/preconditioned_sharpness` | as above, Adam-like optimizers     | `iters` more HVPs                |
| `curvature/margin`                   | as above                           | free                             |

An LR jump is the LR having grown `lr_jump`× since the last measurement. The forward and backward keep
their graph for the Hessian-vector products (HVPs), each of which costs about 2–3 backward passes.

λ_max, the largest algebraic eigenvalue, comes from ``iters`` Lanczos steps on Hessian-vector products (double
backward, Pearlmutter 1994) — not power iteration, which finds the eigenvalue of largest magnitude, often a negative
one on a non-convex loss — and tr(H) from Hutchinson's estimator with Rademacher vectors. The margin compares the
learning rate with the stability limit of the quadratic model: η·λ_max/2 for gradient descent (Cohen et al. 2021,
"edge of stability"); η·λ_max/(2 + 2β) with heavy-ball momentum β; and for Adam the preconditioned sharpness
λ_max(P⁻¹H), P = (1 − β₁ᵗ)·diag(√v̂ + ε), against Adam's threshold (2 + 2β₁)/((1 − β₁)η) (Cohen et al.
2022). A margin ≥ 1 means the top curvature direction is amplified at every step; training at the edge
of stability sits near 1 and is benign; a learning-rate jump sends it far above. With parameter groups at
different LRs the margin is that of the fastest group's LR on the LR-weighted Hessian D^½HD^½, D = η_i/η_max
(a group at LR 0 drops out), which costs ``iters`` more Hessian-vector products for SGD-type optimizers; the
LR-jump trigger watches the largest LR.

It is the costliest probe by far, and opt-in (in no probe set): on keel's small proxy on a CPU one
measurement took 1.1 s with ``iters=8`` and no trace (≈ 19 training steps) and 3.9 s with the defaults
below and AdamW (≈ 65 steps), i.e. +65 % of the training time at ``every=100``
(``keel bench detect --probe-costs``, BENCHMARKS.md). Keep it sparse; the ``lr_jump`` trigger is what
catches an LR spike in time.

The curvature needs a loss with its graph, which a probe does not get: give the probe a ``closure`` that
computes the loss of a fixed batch (``lambda: loss_fn(model(xb), yb)``). The probe runs it under
`keel.signals.quiet` (other hooks see nothing), with the RNG state forked and the module buffers restored,
and uses ``torch.autograd.grad`` only, so parameters, their ``.grad`` and the optimizer state are
untouched. Without a closure it measures nothing and warns once; a closure whose loss does not depend on the
parameters gives nothing; one that is not twice differentiable raises (the `Guard` records it and switches
the probe off). A Hessian-vector product that overflows (a float16 model's double backward) gives NaN, not 0.

References:
    Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability",
    arXiv 2103.00065 (code github.com/locuslab/edge-of-stability). Cohen et al. 2022, "Adaptive Gradient
    Methods at the Edge of Stability", arXiv 2207.14484. Wu & Su 2023, "The Implicit Regularization of
    Dynamical Stability in SGD", ICML. Hutchinson 1989, "A stochastic estimator of the trace of the
    influence matrix".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.errors import KeelWarning
from keel._core.validate import check_types, config_from
from keel.signals._hooks import quiet
from keel.signals.probe import Measurements, StepContext
from keel.signals.registry import PROBES


@dataclass(kw_only=True)
class SharpnessConfig:
    """Settings of the sharpness probe.

    Attributes:
        every: Cadence in steps.
        lr_jump: Also measure when the LR exceeds ``lr_jump`` × the LR of the last measurement.
        iters: Lanczos steps: Hessian-vector products per λ_max (fewer only when the Krylov space is exhausted).
        trace_probes: Rademacher vectors for the trace (0: no trace).
        preconditioned: Also measure λ_max(P⁻¹H) for Adam-family optimizers; ``None``: when the optimizer
            has ``exp_avg_sq`` state.
        seed: Seeds the random start vectors.
    """

    every: int = 100
    lr_jump: float = 2.0
    iters: int = 20
    trace_probes: int = 10
    preconditioned: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("every", "iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SharpnessConfig.{name}={value!r}; allowed: an int >= 1")
        if not isinstance(self.trace_probes, int) or self.trace_probes < 0:
            raise ValueError(f"SharpnessConfig.trace_probes={self.trace_probes!r}; allowed: an int >= 0")
        if not (self.lr_jump > 1 and math.isfinite(self.lr_jump)):
            raise ValueError(f"SharpnessConfig.lr_jump={self.lr_jump!r}; allowed: a finite number > 1")


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def top_eigenvalue(
    hvp: Callable[[list[Tensor]], list[Tensor]], like: Sequence[Tensor], *, iters: int, generator: torch.Generator
) -> Tensor:
    """λ_max, the largest algebraic eigenvalue of a symmetric operator, by ``iters`` steps of Lanczos.

    Power iteration, which keel used before, converges to the eigenvalue of largest *magnitude*: on a
    non-convex loss that is often a negative one, and the margin read "negative". Lanczos spends the same
    budget — exactly ``iters`` operator applications (fewer only when the Krylov space is exhausted) — and
    returns the largest Ritz value of the tridiagonal matrix it builds: the largest Rayleigh quotient over the
    Krylov space, which holds every power iterate, so it is never below power iteration's estimate from the
    same start and never above λ_max (up to rounding), whatever the signs of the spectrum. It keeps three
    vectors (no reorthogonalisation: lost orthogonality repeats converged Ritz values, it does not move the
    extreme one, Paige 1980), in float32 or the parameters' wider dtype; the operator sees the parameters'
    dtype. Returns a 0-d float64 tensor: NaN when a product is not finite (a float16 double backward that
    overflowed), 0 when the operator is 0 along everything tried.

    Example:
        >>> A = torch.diag(torch.tensor([-5.0, 1.0, 3.0]))  # power iteration says -5
        >>> round(float(top_eigenvalue(lambda v: [A @ v[0]], [torch.zeros(3)], iters=5,
        ...                            generator=torch.Generator().manual_seed(0))), 4)
        3.0

    References:
        Lanczos 1950; Paige 1980, "Accuracy and effectiveness of the Lanczos algorithm for the symmetric
        eigenproblem"; Ghorbani et al. 2019 (Lanczos on neural-network Hessians).
    """
    work = [torch.promote_types(t.dtype, torch.float32) for t in like]  # the recurrence's precision
    v = [
        torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.device, d)
        for t, d in zip(like, work, strict=True)
    ]
    norm = _dot(v, v).sqrt()
    v = [t / norm.to(t.dtype) for t in v]
    previous: list[Tensor] | None = None
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    beta = torch.zeros((), dtype=torch.float64)
    for i in range(iters):
        w = [h.to(d) for h, d in zip(hvp([t.to(p.dtype) for t, p in zip(v, like, strict=True)]), work, strict=True)]
        if not bool(torch.isfinite(_dot(w, w))):  # the product overflowed: unknown, not 0
            return torch.full((), math.nan, dtype=torch.float64)
        alpha = _dot(v, w)
        alphas.append(alpha)
        w = [h - alpha.to(h.dtype) * t for h, t in zip(w, v, strict=True)]  # three-term recurrence: w ⟂ v, v_previous
        if previous is not None:
            w = [h - beta.to(h.dtype) * t for h, t in zip(w, previous, strict=True)]
        beta = _dot(w, w).sqrt()
        if i == iters - 1 or not bool(beta > 0):  # budget spent, or an invariant subspace: T is exact
            break
        betas.append(beta)
        previous, v = v, [h / beta.to(h.dtype) for h in w]
    off = torch.stack(betas) if betas else torch.zeros(0, dtype=torch.float64)
    tridiagonal = torch.diag(torch.stack(alphas)) + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(tridiagonal).max()


def hutchinson_trace(
    hvp: Callable[[list[Tensor]], list[Tensor]], like: Sequence[Tensor], *, probes: int, generator: torch.Generator
) -> Tensor:
    """tr(H) ≈ mean of zᵀHz over Rademacher vectors z (0-d float64).

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -0.5]))
        >>> float(hutchinson_trace(lambda v: [A @ v[0]], [torch.zeros(3)], probes=4,
        ...                        generator=torch.Generator().manual_seed(0)))
        3.5
    """
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(probes):
        z = [(torch.randint(0, 2, t.shape, generator=generator) * 2 - 1).to(t) for t in like]
        total = total + _dot(z, hvp(z))
    return total / max(probes, 1)


@PROBES.register("sharpness")
class SharpnessProbe:
    """Measures curvature on a fixed batch every ``every`` steps, and when the LR jumps.

    Args:
        closure: Returns the loss of a fixed batch, with its graph (``lambda: loss_fn(model(xb), yb)``).
        config: Settings; or pass `SharpnessConfig` fields as keywords.
    """

    name = "sharpness"

    def __init__(
        self, closure: Callable[[], Tensor] | None = None, config: SharpnessConfig | None = None, **fields: object
    ) -> None:
        self.closure = closure
        self.config = config_from(self, SharpnessConfig, config, fields)
        self._last_lr: float | None = None
        self._warned = False

    def _due(self, step: int, lr: float) -> bool:
        if step % self.config.every == 0 or self._last_lr is None:
            return True
        return lr > self.config.lr_jump * self._last_lr

    def measure(self, ctx: StepContext) -> Measurements:
        lr = max(float(g["lr"]) for g in ctx.optimizer.param_groups)  # the fastest group sets the margin
        if not self._due(ctx.step, lr):
            return {}
        if self.closure is None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "sharpness: no closure given, nothing measured; pass SharpnessProbe(closure=lambda: "
                    "loss_fn(model(xb), yb))",
                    KeelWarning,
                    stacklevel=2,
                )
            return {}
        self._last_lr = lr
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(self.config.seed + ctx.step)
        buffers = {name: b.detach().clone() for name, b in ctx.model.named_buffers()}
        try:
            with quiet(), torch.random.fork_rng(devices=[]), torch.enable_grad():
                out = self._curvature(ctx.optimizer, params, generator, lr)
        except RuntimeError as exc:
            raise RuntimeError(
                f"sharpness: the closure's loss cannot be differentiated twice with respect to the "
                f"parameters ({exc}); the probe needs a twice-differentiable loss"
            ) from exc
        finally:
            with torch.no_grad():
                for name, b in ctx.model.named_buffers():
                    b.copy_(buffers[name])
        return out

    def _curvature(
        self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], generator: torch.Generator, lr: float
    ) -> Measurements:
        assert self.closure is not None
        loss = self.closure()
        all_grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(p, g) for p, g in zip(params, all_grads, strict=True) if g is not None]
        if not pairs:  # the loss does not depend on the parameters: no curvature to measure
            return {}
        if not all(g.requires_grad for _, g in pairs):  # a gradient without a graph: @once_differentiable somewhere
            raise RuntimeError(
                "a gradient has no graph to differentiate (an autograd.Function marked "
                "@once_differentiable, or a gradient constant in the parameters)"
            )
        params, grads = [p for p, _ in pairs], [g for _, g in pairs]

        def hvp(v: list[Tensor]) -> list[Tensor]:
            out = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True, allow_unused=True)
            return [o.detach() if o is not None else torch.zeros_like(p) for o, p in zip(out, params, strict=True)]

        def scaled(hvp: Callable[[list[Tensor]], list[Tensor]], scale: list[Tensor]) -> Callable:
            def apply(v: list[Tensor]) -> list[Tensor]:  # S H S: similar to S² H
                hv = hvp([t * s for t, s in zip(v, scale, strict=True)])
                return [t * s for t, s in zip(hv, scale, strict=True)]

            return apply

        iters = self.config.iters
        sharpness, preconditioned = keys.CURVATURE_SHARPNESS, keys.CURVATURE_PRECONDITIONED_SHARPNESS
        top = top_eigenvalue(hvp, params, iters=iters, generator=generator).float()
        out: Measurements = {sharpness: top}
        if self.config.trace_probes:
            trace = hutchinson_trace(hvp, params, probes=self.config.trace_probes, generator=generator)
            out[keys.CURVATURE_TRACE] = trace.float()
        # Parameter groups with different LRs: the update is θ − D·η_max·∇ with D = diag(η_i / η_max), so the margin
        # needs λ_max(D^½ H D^½) (groups with LR 0 drop out); with one LR for all, D = 1 and that is λ_max(H).
        relative = _relative_lrs(optimizer, params, lr)
        adam = _adam_preconditioner(optimizer, params) if self.config.preconditioned is not False else None
        top_preconditioned = None
        if adam is not None:
            scale = adam if relative is None else [a * r for a, r in zip(adam, relative, strict=True)]
            top_preconditioned = top_eigenvalue(scaled(hvp, scale), params, iters=iters, generator=generator).float()
            out[preconditioned] = top_preconditioned
        adam_like = any("betas" in g for g in optimizer.param_groups)
        if top_preconditioned is not None or not adam_like or self.config.preconditioned is False:
            lam = (
                top
                if relative is None
                else top_eigenvalue(scaled(hvp, relative), params, iters=iters, generator=generator).float()
            )
            # an Adam without state has no margin yet
            out[keys.CURVATURE_MARGIN] = _margin(optimizer, lr, lam, top_preconditioned)
        return out

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}


def _relative_lrs(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], lr_max: float) -> list[Tensor] | None:
    """Per parameter sqrt(η_group / η_max) as 0-d tensors, or None when every group has the same LR."""
    lrs = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    mine = [lrs.get(id(p), lr_max) for p in params]
    if lr_max <= 0 or all(x == lr_max for x in mine):
        return None
    return [
        torch.tensor(math.sqrt(x / lr_max), dtype=p.dtype, device=p.device) for x, p in zip(mine, params, strict=True)
    ]


def _adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor] | None:
    """Per parameter 1/sqrt(P) with P = (1 − β₁ᵗ)(√v̂ + ε), or None when the optimizer keeps no ``exp_avg_sq``."""
    hyper = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    scales = []
    for p in params:
        state, group = optimizer.state.get(p, {}), hyper.get(id(p))
        if (
            group is None
            or "exp_avg_sq" not in state
            or "betas" not in group
            or not isinstance(group.get("eps"), int | float)
        ):
            return None
        beta1, beta2 = group["betas"]
        step = max(float(state.get("step", 1)), 1.0)  # a step count of 0 would divide by 1 − β2⁰ = 0
        denom = (state["exp_avg_sq"].float() / (1 - beta2**step)).sqrt() + group["eps"]
        scales.append((1.0 / ((1 - beta1 ** (step + 1)) * denom)).sqrt().to(p.dtype))
    return scales


def _margin(optimizer: torch.optim.Optimizer, lr: float, lam: Tensor, preconditioned: Tensor | None) -> Tensor:
    """η_max·λ over the optimizer's stability threshold (GD: 2; heavy ball: 2 + 2β; Adam: (2 + 2β₁)/(1 − β₁)).

    ``lam`` is λ_max of the LR-scaled Hessian (`SharpnessProbe._curvature`), ``preconditioned`` Adam's
    preconditioned sharpness when it was measured; the momentum or β₁ is that of the group with the largest LR.
    """
    group = max(optimizer.param_groups, key=lambda g: float(g["lr"]))
    if preconditioned is not None and "betas" in group:
        beta1 = float(group["betas"][0])
        return preconditioned * lr * (1 - beta1) / (2 + 2 * beta1)
    momentum = float(group.get("momentum", 0.0) or 0.0)
    return lam * lr / (2 + 2 * momentum)


def sharpness_probe_for(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch: tuple[Tensor, ...],
    config: SharpnessConfig | None = None,
    **fields: object,
) -> SharpnessProbe:
    """A `SharpnessProbe` on a fixed batch: ``loss_fn(model(*inputs), target)`` with ``batch = (*inputs, target)``."""
    *inputs, target = batch
    return SharpnessProbe(lambda: loss_fn(model(*inputs), target), config, **fields)
