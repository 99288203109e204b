"""EvoMoE's dense-to-sparse (DTS) gate with its temperature schedule, as a hook on an existing router.

Nie et al. (2021), "EvoMoE: An Evolutional Mixture-of-Experts Training Framework via Dense-To-Sparse Gate",
arXiv 2112.14397; official code ``codecaution/EvoMoE`` (``fairseq/modules/moe/topkgate.py``,
``fairseq_cli/train.py``, ``fairseq/dataclass/configs.py``). See reference/seed-catalog.md T10.

In training the gate is a Gumbel-softmax of the router's log-probabilities at temperature τ, g = GumbelSoftmax(
log softmax(x), τ), and every expert whose gate exceeds a threshold runs, weighted by g: at high τ almost every
expert is active (dense), and as τ anneals the gate sharpens. From the hard-switch update on, each token goes to
the argmax of its Gumbel sample alone, weighted by that gate (top-1). Outside training the gate is top-1 of the
router's softmax, as the official ``TopKGate`` evaluates.

τ schedule (official ``fairseq_cli/train.py``), with D the decay length:
    exp:    τ_t = max(τ_max · exp(t · ln(τ_min / τ_max) / D), τ_min)
    linear: τ_t = max(τ_max − t · (τ_max − τ_min) / D, τ_min)

Official defaults: τ_max 1.0, τ_min 0.5, D (``gumbel_decay_factor``) 1 — τ reaches τ_min at update 1 — and
``switch_to_hard_gumbel_softmax`` −1, which makes the gate hard from update 0, so the dense phase never happens
unless it is set. keel therefore requires the hard-switch update and anneals over the dense phase by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from keel.losses._router_layout import split_router_output

SCHEDULES = ("exp", "linear")
# fairseq/dataclass/configs.py defaults in the official code.
TAU_MAX = 1.0
TAU_MIN = 0.5
# GUMBEL_THRESHOLD: 0.001 at the commit the seed catalog read (d1e49d2); 0.02 in another stored version (09f0d09).
THRESHOLD = 0.001


@dataclass
class DenseToSparseSchedule:
    """The gate's temperature and phase as a function of the update count, shared by every DTS router of a model.

    ``update`` counts training forwards of the model (the model's forward pre-hook advances it; the first training
    forward is update 0), or, after `follow`, the optimizer's steps: under gradient accumulation call
    ``schedule.follow(optimizer)``, else ``hard_step`` and ``decay_steps`` are in forwards (N per update).

    Attributes:
        hard_step: First update routed hard (top-1 of the Gumbel sample).
        decay_steps: D, the updates τ takes from τ_max to τ_min.
        tau_max: τ at update 0.
        tau_min: The floor of τ.
        schedule: ``"exp"`` or ``"linear"``.
        threshold: Gate value an expert must exceed to run.
        update: The current update (−1 before the first training forward).
    """

    hard_step: int
    decay_steps: int
    tau_max: float = TAU_MAX
    tau_min: float = TAU_MIN
    schedule: str = "exp"
    threshold: float = THRESHOLD
    update: int = -1
    _optimizer_hook: RemovableHandle | None = field(default=None, init=False, repr=False, compare=False)

    def temperature(self, update: int | None = None) -> float:
        """τ at ``update`` (the current update when None)."""
        t = max(self.update if update is None else update, 0)
        if self.schedule == "exp":
            return max(
                self.tau_max * math.exp(t * math.log(self.tau_min / self.tau_max) / self.decay_steps), self.tau_min
            )
        return max(self.tau_max - t * (self.tau_max - self.tau_min) / self.decay_steps, self.tau_min)

    def is_hard(self, update: int | None = None) -> bool:
        """Whether ``update`` (the current one when None) routes each token to one expert."""
        return (self.update if update is None else update) >= self.hard_step

    def advance(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the model: one training forward is one more update (unless it follows an optimizer)."""
        if module.training and self._optimizer_hook is None:
            self.update += 1

    def follow(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Count ``optimizer``'s steps instead of training forwards (right under gradient accumulation and with the
        Hugging Face ``Trainer``): the update before its first step is 0, and each ``step()`` adds one."""

        def stepped(*_: Any) -> None:
            self.update += 1

        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
        self.update = max(self.update, 0)
        self._optimizer_hook = optimizer.register_step_post_hook(stepped)
        return self._optimizer_hook


def dense_to_sparse_route(logits: Tensor, schedule: DenseToSparseSchedule, *, training: bool) -> tuple[Tensor, Tensor]:
    """(weights, chosen experts) of the DTS gate for ``(T, E)`` router logits.

    Dense phase: every expert index in order, weighted g·[g > threshold] (an expert below it gets weight 0 and
    contributes nothing; it is still computed). Hard phase: ``(T, 1)`` argmax of the Gumbel sample with its gate
    value. Outside training: ``(T, 1)`` top-1 of softmax(logits) with its probability.
    """
    logits = logits.float()
    if not training:
        weights, chosen = logits.softmax(dim=-1).max(dim=-1, keepdim=True)
        return weights, chosen
    gates = F.gumbel_softmax(logits.log_softmax(dim=-1), tau=schedule.temperature(), hard=False)
    gates = gates * (gates > schedule.threshold)
    if schedule.is_hard():
        weights, chosen = gates.max(dim=-1, keepdim=True)
        return weights, chosen
    chosen = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape[0], -1)
    return gates, chosen


class DenseToSparseHook:
    """Forward hook on a router returning ``(logits, weights, indices)``: replaces weights and indices by the DTS
    gate's (`dense_to_sparse_route`); the logits pass through for probes and aux losses."""

    def __init__(self, schedule: DenseToSparseSchedule) -> None:
        self.schedule = schedule

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        logits, weights, _ = split_router_output(output)
        new_weights, chosen = dense_to_sparse_route(logits, self.schedule, training=module.training)
        if weights is not None and weights.is_floating_point():
            new_weights = new_weights.to(weights.dtype)
        return type(output)((logits, new_weights, chosen, *output[3:]))
