"""Stabilizer ``router_z_loss``: ST-MoE's router z-loss on every MoE router, injected in backward (Megatron-style).

Zoph et al. (2022), "ST-MoE", arXiv 2202.08906.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from keel.losses._checks import check_number
from keel.losses.router import ROUTER_Z_LOSS_COEFFICIENT
from keel.nn.stabilizers._base import Change, stabilizers
from keel.nn.stabilizers._router_loss import attach_router_loss, check_router_options


@stabilizers.register("router_z_loss")
@dataclass(kw_only=True)
class RouterZLossStabilizer:
    """Add ``coefficient · mean_tokens(logsumexp(router logits))²`` to the gradient of every MoE router.

    Routers are found by layout: a ``gate`` / ``router`` module with a 2-D weight (E ≥ 2, d) beside an ``experts``
    child (Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE ``mlp.gate``, Mixtral 4.x ``block_sparse_moe.gate``,
    keel's proxy MoE), the ``classifier`` of a weightless ``router`` beside ``experts`` (Switch Transformers,
    NLLB-MoE), or named in ``routers``. A `keel.nn.RouterAuxLossHook` on each injects the loss's gradient in
    backward through the routing weights (Megatron's ``MoEAuxLossAutoScaler``), so the model's function and the
    loop's loss are unchanged; ``hook.last`` holds the unscaled z of the latest forward. Under gradient
    accumulation or a ``GradScaler`` call `keel.nn.set_router_loss_scale` with the loop's loss factor.

    Attributes:
        coefficient: c_z (1e-3, ST-MoE; Megatron: "1e-3 is a good start").
        routers: Qualified names of the router modules; None finds them by layout.
    """

    name: ClassVar[str] = "router_z_loss"
    description: ClassVar[str] = "ST-MoE router z-loss 1e-3·mean(lse²) injected in backward; keeps router logits small"
    reference: ClassVar[str] = "Zoph et al. 2022 (ST-MoE, arXiv 2202.08906); Megatron-LM MoEAuxLossAutoScaler"
    order: ClassVar[int] = 45

    coefficient: float = ROUTER_Z_LOSS_COEFFICIENT
    routers: list[str] | None = None

    def __post_init__(self) -> None:
        check_number("RouterZLossStabilizer.coefficient", self.coefficient, low=0.0)
        check_router_options("RouterZLossStabilizer", self.routers, None)

    def apply(self, model: nn.Module) -> list[Change]:
        return attach_router_loss(
            model, stabilizer=self.name, kind=self.name, coefficient=self.coefficient, routers=self.routers, top_k=None
        )
