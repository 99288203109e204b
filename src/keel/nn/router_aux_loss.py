"""RouterAuxLossHook: a router's z-loss or load-balancing loss injected into the backward pass, Megatron-style.

Megatron-LM's ``MoEAuxLossAutoScaler`` (``megatron/core/transformer/moe/moe_utils.py``) attaches an auxiliary loss
to an activation: the forward returns the activation unchanged and the backward adds the gradient of the aux loss,
so the user's loss (what the loop reports and optimises) stays untouched and no loop has to collect the terms.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from keel._core import KeelWarning
from keel.losses._router_layout import split_router_output
from keel.losses.router import load_balancing_loss, router_z_loss

AUX_KINDS = ("router_z_loss", "load_balancing")


class RouterHookWarning(KeelWarning):
    """A router hook could not read a router's output; that forward went on without the aux loss."""


class AuxLossAutoScaler(torch.autograd.Function):
    """A copy of ``carrier`` in forward; in backward, also sends ``scale`` into ``aux_loss``'s graph.

    ``d(aux_loss)/dθ · scale`` is what a ``(loss + aux_loss·scale).backward()`` would have added to θ's gradient,
    as long as ``carrier`` takes part in the loss. A copy, not a view (Megatron returns the input as-is): the model
    may change the tensor in place — NLLB-MoE's router adds Gumbel noise to its logits with ``+=`` when
    ``second_expert_policy="sampling"`` — which autograd refuses on a custom Function's view, and which would also
    change the logits the aux loss saved for its backward. The carrier is a router's (T, E) logits or (T, k) weights.
    """

    @staticmethod
    def forward(ctx: Any, carrier: Tensor, aux_loss: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return carrier.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor, None]:
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class RouterAuxLossHook:
    """Forward hook on a router: computes its aux loss and injects the loss's gradient in backward.

    On each forward the router's logits (and its chosen experts, else the top ``top_k`` of the logits) give the
    unscaled loss — ST-MoE's mean lse² (``router_z_loss``) or Switch's E·Σ f·P, 1 balanced (``load_balancing``) —
    kept detached in ``last`` for monitoring. With gradients on, ``coefficient · loss`` is attached through
    `AuxLossAutoScaler` to the routing weights (``output[1]``, which the experts' sum uses), or to the logits of a
    router that returns only logits.

    The injected gradient does not see the loop's own scaling: a loop that divides its loss by N micro-batches,
    or multiplies it by a ``GradScaler``'s scale, sets ``loss_scale`` to the same factor (Megatron's
    ``MoEAuxLossAutoScaler.set_loss_scale``; `set_router_loss_scale` sets every hook of a model).

    Args:
        kind: ``"router_z_loss"`` or ``"load_balancing"``.
        coefficient: The loss's weight (1e-3 z-loss, 1e-2 balancing).
        top_k: k for a router whose output carries no chosen experts.

    Example:
        >>> gate = nn.Linear(8, 4, bias=False)
        >>> hook = RouterAuxLossHook("router_z_loss", 1e-3)
        >>> handle = hook.attach(gate)
        >>> logits = gate(torch.randn(5, 8))
        >>> hook.last.shape
        torch.Size([])
    """

    def __init__(self, kind: str, coefficient: float, top_k: int = 1) -> None:
        if kind not in AUX_KINDS:
            raise ValueError(f"RouterAuxLossHook.kind={kind!r}; allowed: {', '.join(AUX_KINDS)}")
        self.kind = kind
        self.coefficient = float(coefficient)
        self.top_k = top_k
        self.loss_scale = 1.0
        self.last: Tensor | None = None
        self._warned = False

    def attach(self, module: nn.Module) -> RemovableHandle:
        """Register on ``module`` (a router) as a forward hook."""
        return module.register_forward_hook(self)

    def unscaled(self, output: Any) -> Tensor:
        """The unscaled aux loss of one router output (with its graph)."""
        logits, _, chosen = split_router_output(output)
        if self.kind == "router_z_loss":
            return router_z_loss(logits, coefficient=1.0)
        if chosen is None:
            chosen = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices
        return load_balancing_loss(logits, chosen, coefficient=1.0)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        try:
            loss = self.unscaled(output)
        except (TypeError, ValueError, RuntimeError) as error:  # keel never stops training: warn once, pass through
            if not self._warned:
                self._warned = True
                warnings.warn(f"{self.kind} on {type(module).__name__}: {error}", RouterHookWarning, stacklevel=2)
            return None
        self.last = loss.detach()
        if not (torch.is_grad_enabled() and loss.requires_grad and self.coefficient > 0):
            return None
        if isinstance(output, Tensor):
            return AuxLossAutoScaler.apply(output, self.coefficient * loss, self.loss_scale)
        at = 1 if isinstance(output[1], Tensor) and output[1].requires_grad else 0
        parts = list(output)
        parts[at] = AuxLossAutoScaler.apply(parts[at], self.coefficient * loss, self.loss_scale)
        return type(output)(parts) if isinstance(output, tuple) else parts


def router_loss_hooks(model: nn.Module) -> list[RouterAuxLossHook]:
    """Every `RouterAuxLossHook` on ``model``'s modules."""
    return [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, RouterAuxLossHook)]


def set_router_loss_scale(model: nn.Module, scale: float) -> None:
    """Scale the gradient every router aux-loss hook of ``model`` injects (1/N micro-batches, a GradScaler's scale).

    Raises:
        ValueError: ``scale`` is not a finite number > 0.
    """
    if not (isinstance(scale, int | float) and not isinstance(scale, bool) and 0 < scale < float("inf")):
        raise ValueError(f"scale={scale!r}; allowed: a finite number > 0")
    for hook in router_loss_hooks(model):
        hook.loss_scale = float(scale)
