"""Load collapse without the load-balancing loss (Shazeer et al. 2017; Switch, Fedus et al. 2021).

keel's tiny proxy with MoE blocks of 8 experts, top-1 (Switch) routing, dropless, and no auxiliary loss, at the
proxy's default LR 1e-3: the self-reinforcing choice sends every token of a layer to one expert within ~25 steps
(imbalance 8 = E/k, 14 of the 16 experts dead), and the routers never re-balance (imbalance ~6 and 4–5 dead experts
at step 200). The reference is the same recipe with the Switch load-balancing loss 1e-2, under which no expert
stays dead.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios._moe import MoeScenario
from keel.proxy.moe import MoeConfig
from keel.proxy.trainer import TrainConfig

EXPERTS, STEPS = 8, 200


@SCENARIOS.register("moe_load_collapse")
class MoeLoadCollapse(MoeScenario):
    spec = ScenarioSpec(
        name="moe_load_collapse",
        healthy=False,
        expected_kind="load_collapse",
        summary=f"tiny MoE proxy ({EXPERTS} experts, top-1) without the balancing loss: the tokens of each layer "
        "pile onto a few experts and the rest die",
        fix="load-balancing loss 1e-2",
    )

    def recipe(self, seed: int) -> TrainConfig:
        moe = MoeConfig(num_experts=EXPERTS, top_k=1, aux_loss=0.0)
        return TrainConfig(size="tiny", steps=STEPS, moe=moe, seed=seed)

    def fixed(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=STEPS, moe=MoeConfig(num_experts=EXPERTS, top_k=1), seed=seed)
