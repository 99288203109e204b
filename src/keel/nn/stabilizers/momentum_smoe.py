"""Stabilizer ``momentum_smoe``: MomentumSMoE's heavy-ball residual on every MoE block (Teo & Nguyen 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from keel.nn._moe import find_routers, hooks_of
from keel.nn.momentum_smoe import MOMENTUM, STEP_SIZE, MomentumResidualHook, MomentumState, check_momentum_options
from keel.nn.stabilizers._base import Change, stabilizers
from keel.nn.stabilizers._router_loss import check_router_options


@stabilizers.register("momentum_smoe")
@dataclass(kw_only=True)
class MomentumSMoEStabilizer:
    """Make every MoE block return the momentum p ← μ·p + γ·block(x), carried through the layer stack.

    The MoE blocks are the parents of the routers (found as `RouterZLossStabilizer` finds them): Hugging Face
    ``mlp`` (``*SparseMoeBlock``), keel's proxy ``MoeMLP``. Their layers must add the block's output to the
    residual stream (``x + block(x)``, as every pre-LN transformer does); `keel.nn.momentum_smoe` has the recursion
    and the sign convention. A `MomentumState` (``change.extra``) holds p; the model's forward pre-hook and hook
    reset it, so p starts at 0 with each forward and no graph is kept between forwards. A block called outside the
    model's forward (activation-checkpoint recomputation) sees whatever p the forward left: do not combine the
    two. μ = 0, γ = 1 is the model unchanged.

    Attributes:
        momentum: μ (0.7, every official script).
        step_size: γ (1.0, ``gamma2`` in the official scripts).
        routers: Qualified names of the routers whose blocks to change; None finds them by layout.
    """

    name: ClassVar[str] = "momentum_smoe"
    description: ClassVar[str] = "MomentumSMoE heavy-ball residual p←0.7p+SMoE(x) across MoE layers; steadier routing"
    reference: ClassVar[str] = "Teo & Nguyen 2024 (MomentumSMoE, arXiv 2410.14574); rachtsy/MomentumSMoE"
    order: ClassVar[int] = 50

    momentum: float = MOMENTUM
    step_size: float = STEP_SIZE
    routers: list[str] | None = None

    def __post_init__(self) -> None:
        check_momentum_options("MomentumSMoEStabilizer", self.momentum, self.step_size)
        check_router_options("MomentumSMoEStabilizer", self.routers, None)

    def apply(self, model: nn.Module) -> list[Change]:
        blocks: dict[int, tuple[str, nn.Module]] = {}
        for site in find_routers(model, self.routers, f"{self.name}.routers"):
            if site.block is not None and not hooks_of(site.block, MomentumResidualHook):
                blocks.setdefault(id(site.block), (site.name.rpartition(".")[0], site.block))
        if not blocks:
            return []
        state = MomentumState()
        resets = (model.register_forward_pre_hook(state.reset), model.register_forward_hook(state.reset))
        changes = []
        for i, (name, block) in enumerate(blocks.values()):
            handle = block.register_forward_hook(MomentumResidualHook(state, self.momentum, self.step_size))
            changes.append(
                Change(
                    stabilizer=self.name,
                    name=name,
                    old=block,
                    new=block,
                    handles=(handle, *resets) if i == 0 else (handle,),
                    extra=state,
                    how=f"forward hook returns p ← {self.momentum:g}·p + {self.step_size:g}·block(x)",
                )
            )
        return changes
