"""⊥Grad (OrthoGrad): step any optimizer on the part of each gradient orthogonal to its weights.

From Prieto et al. (2025), "Grokking at the edge of numerical stability" (arXiv 2501.04697).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim import Optimizer

from keel._core.validate import refuse_closure_only
from keel.optim._helpers import (
    accumulation_dtype,
    check_range,
    grads_of,
    group_by_device_dtype,
    params_with_grad,
    refuse_float16,
    unit_scales,
)
from keel.optim._registry import optimizers

_TINY = 1e-30  # the reference's guard; representable in fp32 and bf16
# float32 and bfloat16 share an 8-bit exponent: Σg² overflows once |g| ≈ 1e18 per entry. Their gradients are
# scaled to about unit norm by a power of two (exact) before the dot products; float16 (whose Σg² cannot overflow
# the float32 accumulator) and float64 are left as they are, saving that pass.
_SCALED_DTYPES = (torch.float32, torch.bfloat16)
_SAFE_NORM = 2.0**64  # below it, w·g and ‖g⊥‖ cannot overflow float32 for any ‖w‖ < 2^63
_PARALLEL = 4.0  # ‖g⊥‖ ≤ this·√n·ε·‖g‖ (or the gradient dtype's ε): g is parallel to w up to rounding
_OVERFLOWED_SCALE = 2.0**-80  # ‖g‖ = inf in float32: 2^-80·g has entries ≤ 2^48, Σ of 2^30 squares ≤ 2^126


def orthogonalize_(params: Sequence[Tensor], grads: Sequence[Tensor], *, eps: float = _TINY) -> None:
    """Replace each gradient g by its component orthogonal to its weights w, rescaled to ‖g‖, in place.

    g⊥ = g − (w·g)/(w·w + eps)·w, then g⊥ ← g⊥·‖g‖/(‖g⊥‖ + eps). For an all-zero w the projection is
    the identity; for an all-zero g the result is 0. The scalars are computed in float32 (float64 for float64
    tensors). All tensors share one dtype (`OrthoGrad` buckets them so).

    Overflow: float32 and bfloat16 gradients are first scaled by a power of two to about unit norm (exact, one
    pass), so a finite gradient whose squares overflow float32 (|g| ≳ 1e18) is projected as exactly as a small
    one (the reference's ‖g‖ = inf gave inf/inf = NaN); the result is scaled back. A coefficient that is still
    not finite (‖w‖ ≳ 1e19) leaves that gradient unprojected. In bfloat16 and float16 the coefficient is
    applied in two parts (c rounded to the dtype, then the remainder), so a gradient nearly parallel to w keeps
    no parallel component from rounding c.

    A gradient parallel to its weights up to rounding (‖g⊥‖ ≤ max(ε_g, 4√n·ε_acc)·‖g‖; always so for a
    1-element parameter, a bias of one output or a learned temperature) gives g⊥ = 0, the exact value: such a
    parameter does not train under ⊥Grad. The reference rescales the rounding residue to ‖g‖ instead, an update of
    full size whose sign flips when w moves by one ulp; keel departs from it here (put scalars you want trained in
    another optimizer).
    """
    if not params:
        return
    params, grads = list(params), list(grads)  # the foreach kernels take lists (or tuples) only
    acc = accumulation_dtype(params[0].dtype)
    g_norm = torch.stack(torch._foreach_norm(grads, 2, dtype=acc))
    scaled = grads[0].dtype in _SCALED_DTYPES and _may_overflow(g_norm)
    scales = unit_scales(g_norm, at_inf=_OVERFLOWED_SCALE) if scaled else torch.ones_like(g_norm)
    if scaled:
        torch._foreach_mul_(grads, [s.to(g.dtype) for s, g in zip(scales.unbind(), grads, strict=True)])
    dots = torch.stack(
        [torch.dot(w.reshape(-1).to(acc), g.reshape(-1).to(acc)) for w, g in zip(params, grads, strict=True)]
    )
    w_norm = torch.stack(torch._foreach_norm(params, 2, dtype=acc))
    coeffs = dots / (w_norm.square() + eps)
    coeffs = torch.where(torch.isfinite(coeffs), coeffs, 0.0)
    _subtract_multiple_(grads, params, coeffs)
    perp_norm = torch.stack(torch._foreach_norm(grads, 2, dtype=acc))
    # ‖ĝ‖ = ‖g‖·scale (exact) unless ‖g‖ overflowed; then from ĝ = ĝ⊥ + c·w with ĝ⊥ ⊥ w.
    scaled_norm = torch.where(torch.isfinite(g_norm), g_norm * scales, torch.hypot(perp_norm, coeffs.abs() * w_norm))
    factors = (scaled_norm / (perp_norm + eps) / scales).clamp(max=torch.finfo(acc).max)
    # a gradient parallel to its weights (every 1-element parameter's) leaves only rounding residue, which the
    # rescale would blow up to the gradient's full size with a sign set by the last bit: g⊥ = 0, the exact value
    factors = torch.where(perp_norm <= _parallel_below(params, acc) * scaled_norm, 0.0, factors)
    torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors.unbind(), grads, strict=True)])


def _parallel_below(params: Sequence[Tensor], acc: torch.dtype) -> Tensor:
    """Per tensor, the ‖g⊥‖/‖g‖ below which g is parallel to w up to rounding: the gradient dtype's own ε, or the
    error of an n-term dot product in the accumulation dtype (``_PARALLEL``·√n·ε), whichever is larger."""
    return _parallel_limits(tuple(p.numel() for p in params), params[0].dtype, acc, params[0].device)


@functools.lru_cache(maxsize=64)
def _parallel_limits(numels: tuple[int, ...], dtype: torch.dtype, acc: torch.dtype, device: torch.device) -> Tensor:
    # made once per parameter layout: a tensor built from host numbers each step would be a host→device copy
    eps_grad, eps_acc = torch.finfo(dtype).eps, torch.finfo(acc).eps
    return torch.tensor([max(eps_grad, _PARALLEL * math.sqrt(n) * eps_acc) for n in numels], dtype=acc, device=device)


def _may_overflow(norms: Tensor) -> bool:
    """Whether the dot products of these gradients need the unit scaling. On CPU the norms are read (free there):
    below 2^64 nothing can overflow and the scaling pass (15–25 % of the projection's time) is skipped; the result is
    the same, as scaling by a power of two is exact. Elsewhere always (deciding would take a device sync)."""
    if norms.device.type != "cpu":
        return True
    return not bool((norms < _SAFE_NORM).all())


def _subtract_multiple_(grads: list[Tensor], params: list[Tensor], coeffs: Tensor) -> None:
    """g ← g − c·w in one pass per tensor (0-d c broadcasts, no temporary); for bfloat16/float16 in two, c rounded
    to the dtype then the remainder, so c is applied to float32 precision."""
    dtype = grads[0].dtype
    high = coeffs.to(dtype)
    torch._foreach_addcmul_(grads, params, list(high.neg().unbind()))
    if dtype not in (torch.float32, torch.float64):
        low = (coeffs - high.to(coeffs.dtype)).to(dtype)
        torch._foreach_addcmul_(grads, params, list(low.neg().unbind()))


class OrthoGrad(Optimizer):
    """⊥Grad: projects every gradient orthogonal to its parameter, then steps the wrapped optimizer.

    Use it to stop "naive loss minimisation" — growth of the weights along themselves that only scales
    the logits up — which drives softmax collapse and delays generalisation (grokking) when training
    without weight decay. ``OrthoGrad(torch.optim.AdamW(...))`` is the paper's ⊥AdamW.

    The wrapper shares the base optimizer's ``param_groups``, ``state`` and ``defaults`` (the same
    objects), so its hyper-parameters are the base's, an LR scheduler attached to the wrapper drives the
    base, and ``state_dict``/``load_state_dict`` round-trip the base's own format. The reference builds
    the base from the wrapper's groups and loads state into the wrapper, so loaded betas/eps never reach
    the base and a scheduler on the wrapper never changes the base's LR; keel avoids both.

    Gradients are projected in place: after ``step()`` ``p.grad`` holds g⊥.

    Args:
        optimizer: The base optimizer: any ``torch.optim.Optimizer`` whose ``step`` runs without a closure (not
            ``torch.optim.LBFGS``, which re-evaluates the loss itself: those are refused with a ValueError).
        eps: Guard added to ‖w‖² and ‖g⊥‖ (1e-30 as in the reference).

    Example:
        >>> model = torch.nn.Linear(4, 2, bias=False)
        >>> opt = OrthoGrad(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); sched.step()
        >>> opt.optimizer.param_groups[0]["lr"]
        0.05

    References:
        Prieto, Barsbey, Mediano, Birdal (2025), "Grokking at the edge of numerical stability",
        arXiv 2501.04697. Official code: LucasPrietoAl/grokking-at-the-edge-of-numerical-stability,
        ``orthograd.py``.
    """

    def __init__(self, optimizer: Optimizer, *, eps: float = _TINY) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer={type(optimizer).__name__}; allowed: a torch.optim.Optimizer instance")
        check_range("OrthoGrad", "eps", eps, 0.0, 1.0)
        refuse_closure_only("OrthoGrad", optimizer)  # step() projects the gradients, then steps the base without one
        self.optimizer = optimizer
        self.eps = eps
        # Optimizer.__init__ sets up the hook dictionaries and step profiling; it re-adds the base's group
        # dicts (the same objects), then the wrapper adopts the base's containers outright.
        self._initializing = True
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._initializing = False
        self._share()

    def _share(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Project every gradient, then call the base optimizer's ``step``.

        With a closure, it is evaluated first (with grad enabled) and the base is stepped without it,
        so the projected gradients are the ones used.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in params_with_grad(group, "OrthoGrad")]
        for indices in group_by_device_dtype(params).values():
            chosen = [params[i] for i in indices]
            orthogonalize_(chosen, grads_of(chosen), eps=self.eps)
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._share()

    def __getstate__(self) -> dict[str, Any]:
        """The base optimizer and eps too (``Optimizer.__getstate__`` keeps defaults, state and groups only, so a
        deepcopied or unpickled wrapper had no ``optimizer``: AttributeError at its first step)."""
        return {**super().__getstate__(), "optimizer": self.optimizer, "eps": self.eps, "_initializing": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "optimizer" in state:  # unpickled or copied, not load_state_dict (which shares again itself)
            self._share()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (with its defaults and checks); the wrapper sees it too."""
        if self._initializing:  # Optimizer.__init__ re-adding the base's existing groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._share()

    def __repr__(self) -> str:
        return f"OrthoGrad({self.optimizer!r})"


@optimizers.register("orthograd")
def _create_orthograd(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], *, base: type[Optimizer] | None = None, **kwargs: Any
) -> OrthoGrad:
    """⊥AdamW by default: ``OrthoGrad(base(params, **kwargs))`` with ``base`` = ``torch.optim.AdamW``.

    Raises:
        ValueError: float16 parameters with the default base (`refuse_float16`): name a ``base`` that handles
            them (``keel.optim.SPAM``, ``torch.optim.SGD``).
    """
    if base is not None and not (isinstance(base, type) and issubclass(base, Optimizer)):
        shown = f"<a {type(base).__name__} instance>" if isinstance(base, Optimizer) else repr(base)  # repr: lines
        raise TypeError(f"orthograd(base={shown}); allowed: a torch.optim.Optimizer class (not an instance) or None")
    optimizer = (base or torch.optim.AdamW)(params, **kwargs)
    if base is None:
        refuse_float16("orthograd (torch.optim.AdamW base)", optimizer.param_groups)
    return OrthoGrad(optimizer)
