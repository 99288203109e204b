"""A `StepContext` for a model whose gradients are in place, as `keel.Guard` builds one (the probe tests' setup)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from keel.signals import StepContext


def step_context(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int = 0,
    loss: Tensor | None = None,
    log_step: bool = True,
    batch: Any = None,
    with_grad_only: bool = False,
) -> StepContext:
    """Every named parameter (``with_grad_only``: those with a gradient, as the Guard passes them) and its gradient;
    ``loss`` detached (a zero when not given)."""
    named = [(n, p) for n, p in model.named_parameters() if not with_grad_only or p.grad is not None]
    return StepContext(
        step=step,
        loss=torch.zeros(()) if loss is None else loss.detach(),
        model=model,
        optimizer=optimizer,
        names=tuple(n for n, _ in named),
        params=[p for _, p in named],
        grads=[p.grad for _, p in named],  # type: ignore[misc]
        log_step=log_step,
        batch=batch,
    )
