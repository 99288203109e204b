"""A healthy mixture-of-experts run, with the early re-balancing every router goes through.

keel's tiny proxy with MoE blocks (4 experts, top-2, dropless, Switch aux loss 1e-2) at the proxy's default LR
1e-3: at initialisation the routers' logits are near 0 and alike for all tokens, so the load starts skewed
(imbalance ~1.6, sometimes an expert without tokens in the first steps); the balancing loss spreads it within
~150 steps (imbalance ~1.1), the router z stays near its start (log 4)² ≈ 1.9. keel must raise nothing.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios._moe import MoeScenario
from keel.proxy.moe import MoeConfig
from keel.proxy.trainer import TrainConfig


@SCENARIOS.register("moe_healthy")
class MoeHealthy(MoeScenario):
    spec = ScenarioSpec(
        name="moe_healthy",
        healthy=True,
        expected_kind=None,
        summary="tiny MoE proxy (4 experts, top-2, aux 1e-2) at LR 1e-3: the load re-balances early, nothing else",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=200, moe=MoeConfig(), seed=seed)
