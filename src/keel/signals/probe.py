"""The probe contract: how a signal source reads one training step.

A probe measures; it never mutates model, gradients or optimizer state (a test checks this for every
registered probe). It returns 0-d tensors (scalar signals) or `PerParam` vectors, all still on device;
`Guard` packs everything into one tensor and copies it to the host once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


class PerParam(NamedTuple):
    """One value per parameter tensor: ``values[i]`` belongs to ``names[i]``."""

    names: tuple[str, ...]
    values: Tensor


Measurements = dict[str, "Tensor | PerParam"]


@dataclass
class StepContext:
    """What a probe may read at one step (before the optimizer step, after backward and unscaling).

    Attributes:
        step: The step being measured.
        loss: The loss the user passed, detached (0-d tensor).
        model: The user's model.
        optimizer: The user's optimizer.
        names: Names of the trainable parameters that have a gradient at this step.
        params: Those parameters, aligned with ``names``.
        grads: Their gradients, aligned with ``names``.
        log_step: True on steps where per-parameter (``log_every``) signals are due.
        batch: The step's batch, when the loop passed ``guard.step(..., batch=...)`` (else None): for probes that
            measure on the data itself (on their own cadence: a healthy step should cost nothing).
        batch_ids: The example ids of that batch, when the loop passed ``batch_ids`` (else None).
    """

    step: int
    loss: Tensor
    model: nn.Module
    optimizer: torch.optim.Optimizer
    names: tuple[str, ...]
    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    log_step: bool
    batch: Any = None
    batch_ids: Sequence[int] | None = None


@runtime_checkable
class Probe(Protocol):
    """A signal source. Implement `measure`; `after_step` may return ``{}``.

    A probe that reads activations may also define ``attach(model)`` (register its forward hooks; called
    once by `Guard`) and ``detach()`` (remove them; called by `Guard.close`). Hooks reduce on device inside
    the hook and keep no activation tensors; `measure` returns the reductions and resets them.

    Attributes:
        name: The registry name (equals the defining file's stem for built-in probes).
    """

    name: str

    def measure(self, ctx: StepContext) -> Measurements:
        """Signals of this step, read before the optimizer step."""
        ...

    def after_step(self, ctx: StepContext) -> Measurements:
        """Signals that exist only after the optimizer step (an update's size); recorded at ``ctx.step``.

        Called only when the update was applied. Their values travel with the next step's host copy, so
        they cost no extra sync.
        """
        ...
