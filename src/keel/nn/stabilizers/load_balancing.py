"""Stabilizer ``load_balancing``: the Switch load-balancing loss on every MoE router, injected in backward.

Fedus et al. (2021), "Switch Transformers", arXiv 2101.03961.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from keel.losses._checks import check_number
from keel.losses.router import LOAD_BALANCING_COEFFICIENT
from keel.nn.stabilizers._base import Change, stabilizers
from keel.nn.stabilizers._router_loss import attach_router_loss, check_router_options


@stabilizers.register("load_balancing")
@dataclass(kw_only=True)
class LoadBalancingStabilizer:
    """Add ``coefficient · E · Σ_i f_i · P_i`` (1 balanced, E/k collapsed) to the gradient of every MoE router.

    f_i is the fraction of the forward's token assignments routed to expert i (from the router's chosen experts,
    else the top ``top_k`` of its logits) and P_i expert i's mean router probability. Routers are found as
    `RouterZLossStabilizer` finds them; the gradient is injected the same way, so the loop's loss is unchanged and
    ``hook.last`` holds the unscaled value. A Hugging Face model trained with ``output_router_logits=True`` already
    adds its own balancing loss (k times this one, weighted by ``router_aux_loss_coef``); keel's proxy adds one
    when ``MoeConfig.aux_loss > 0``: apply this stabilizer to models that have none, or the two add up.

    Attributes:
        coefficient: α (1e-2, Switch; Megatron's ``moe_aux_loss_coeff`` recommendation).
        routers: Qualified names of the router modules; None finds them by layout.
        top_k: k for routers whose output does not carry the chosen experts and that declare none (``top_k`` /
            ``num_experts_per_tok`` on the router or its block); None reads it there, else 1.
    """

    name: ClassVar[str] = "load_balancing"
    description: ClassVar[str] = "Switch load-balancing loss 1e-2·E·Σf·P injected in backward; spreads tokens"
    reference: ClassVar[str] = "Fedus et al. 2021 (Switch Transformers, arXiv 2101.03961); Megatron-LM"
    order: ClassVar[int] = 46

    coefficient: float = LOAD_BALANCING_COEFFICIENT
    routers: list[str] | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        check_number("LoadBalancingStabilizer.coefficient", self.coefficient, low=0.0)
        check_router_options("LoadBalancingStabilizer", self.routers, self.top_k)

    def apply(self, model: nn.Module) -> list[Change]:
        return attach_router_loss(
            model,
            stabilizer=self.name,
            kind=self.name,
            coefficient=self.coefficient,
            routers=self.routers,
            top_k=self.top_k,
        )
