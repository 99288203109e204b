"""Router-logit growth at a high learning rate (ST-MoE, Zoph et al. 2022, arXiv 2202.08906).

keel's tiny proxy with MoE blocks (4 experts, top-2, dropless, Switch aux loss 1e-2) and QK-norm (so the attention
logits, which grow at this LR too, stay out of it) at peak LR 0.1, AdamW β₂ 0.95, 20-step warm-up: the routers'
logits grow from ~0.7 to ~20 within 25 steps and the router z (mean logsumexp²) from 2 to several hundred; each
router's softmax saturates and its tokens lock onto two experts (imbalance E/k = 2, two dead experts) even with the
balancing loss. The reference is the same recipe with the router z-loss 1e-3, which holds z near 2.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios._moe import MoeScenario
from keel.proxy.moe import MoeConfig
from keel.proxy.trainer import TrainConfig

LR, STEPS = 0.1, 200


@SCENARIOS.register("moe_router_logit_growth")
class MoeRouterLogitGrowth(MoeScenario):
    spec = ScenarioSpec(
        name="moe_router_logit_growth",
        healthy=False,
        expected_kind="router_logit_growth",
        summary=f"tiny MoE proxy (4 experts, top-2, aux 1e-2, QK-norm) at LR {LR:g}: router logits and z grow",
        fix="router z-loss 1e-3",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=STEPS, lr=LR, qk_norm=True, moe=MoeConfig(), seed=seed)

    def fixed(self, seed: int) -> TrainConfig:
        moe = MoeConfig(router_z_loss=1e-3)
        return TrainConfig(size="tiny", steps=STEPS, lr=LR, qk_norm=True, moe=moe, seed=seed)
