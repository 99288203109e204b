"""Stabilizer ``dense_to_sparse``: EvoMoE's dense-to-sparse gate on every MoE router (Nie et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from keel.nn._moe import find_routers, hooks_of
from keel.nn.dense_to_sparse_gate import (
    TAU_MAX,
    TAU_MIN,
    THRESHOLD,
    DenseToSparseHook,
    DenseToSparseSchedule,
    check_schedule_options,
)
from keel.nn.stabilizers._base import Change, stabilizers
from keel.nn.stabilizers._router_loss import check_router_options


@stabilizers.register("dense_to_sparse")
@dataclass(kw_only=True)
class DenseToSparseStabilizer:
    """Route through EvoMoE's Gumbel-softmax gate: dense early, annealed, then hard top-1 from ``hard_step`` on.

    Applies to routers returning ``(logits, weights, indices)`` (Hugging Face 5.x Mixtral / Qwen-MoE / OLMoE
    ``mlp.gate``, keel's proxy router), found as `RouterZLossStabilizer` finds them, whose experts take any number
    of indices per token. A `keel.nn.DenseToSparseHook` on each replaces the weights and indices
    (`keel.nn.dense_to_sparse_gate` has the rule); one `DenseToSparseSchedule` (``change.extra``) shared by all
    routers holds τ and the update count, advanced by a forward pre-hook on the model in training mode, or by the
    optimizer's steps after ``change.extra.follow(optimizer)`` (do that under gradient accumulation). The count is
    a persistent buffer ``dense_to_sparse_update`` on each router: checkpoints, keel's snapshots, rollbacks and
    resumes carry it. The dense
    phase runs every expert on every token: compute is E/k times the sparse model's until ``hard_step``.

    Attributes:
        hard_step: The update from which routing is hard top-1. Required: the official default (−1) turns the
            gate hard at update 0, so without it there is no dense phase.
        decay_steps: Updates τ takes from ``tau_max`` to ``tau_min``; None: ``hard_step`` (the official
            ``gumbel_decay_factor`` default is 1, τ_min at update 1).
        tau_max: Initial temperature (1.0, official default).
        tau_min: Final temperature (0.5, official default).
        schedule: ``"exp"`` (official default) or ``"linear"``.
        threshold: Gate value an expert must exceed to run in the dense phase (0.001).
        routers: Qualified names of the routers; None finds them by layout.
    """

    name: ClassVar[str] = "dense_to_sparse"
    description: ClassVar[str] = "EvoMoE Gumbel-softmax gate: dense, τ 1.0→0.5 (exp), hard top-1 from hard_step"
    reference: ClassVar[str] = "Nie et al. 2021 (EvoMoE, arXiv 2112.14397); codecaution/EvoMoE"
    order: ClassVar[int] = 42

    hard_step: int | None = None
    decay_steps: int | None = None
    tau_max: float = TAU_MAX
    tau_min: float = TAU_MIN
    schedule: str = "exp"
    threshold: float = THRESHOLD
    routers: list[str] | None = None

    def __post_init__(self) -> None:
        owner = "DenseToSparseStabilizer"
        check_schedule_options(
            owner,
            hard_step=self.hard_step,
            decay_steps=self.decay_steps,
            tau_max=self.tau_max,
            tau_min=self.tau_min,
            schedule=self.schedule,
            threshold=self.threshold,
        )
        check_router_options(owner, self.routers, None)

    def apply(self, model: nn.Module) -> list[Change]:
        assert self.hard_step is not None  # __post_init__ refused None
        sites = [s for s in find_routers(model, self.routers, f"{self.name}.routers") if not _has_gate(s.module)]
        if not sites:
            return []
        schedule = DenseToSparseSchedule(
            hard_step=self.hard_step,
            decay_steps=self.decay_steps or max(self.hard_step, 1),
            tau_max=self.tau_max,
            tau_min=self.tau_min,
            schedule=self.schedule,
            threshold=self.threshold,
        )
        advance = model.register_forward_pre_hook(schedule.advance)
        changes = []
        for i, site in enumerate(sites):
            # first among the router's hooks: aux losses and probes applied earlier then see the routing used
            handle = site.module.register_forward_hook(DenseToSparseHook(schedule), prepend=True)
            load_hook = schedule.attach(site.module)
            changes.append(
                Change(
                    stabilizer=self.name,
                    name=site.name,
                    old=site.module,
                    new=site.module,
                    handles=(handle, load_hook, advance) if i == 0 else (handle, load_hook),
                    extra=schedule,
                    how=f"forward hook routes by a Gumbel-softmax gate (τ {self.tau_max:g}→{self.tau_min:g}, "
                    f"{self.schedule}), hard top-1 from update {self.hard_step}",
                )
            )
        return changes


def _has_gate(router: nn.Module) -> bool:
    return bool(hooks_of(router, DenseToSparseHook))
