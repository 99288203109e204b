"""Attention-logit growth at a high learning rate (Dehghani et al. 2023; Wortsman et al. 2023).

keel's tiny proxy (2 layers, d=64) at peak LR 0.1 with AdamW (β₂ 0.95, no weight decay) and a 20-step
warm-up: the max attention logit grows from 0.1 to ~1e3 within 35 steps and to ~3e4 later; attention
turns one-hot and the loss stalls near 3.0. The reference is the same recipe with QK-norm, which keeps the
logits near 10 and ends ~0.3 nats lower; the loss "degrades" where the run falls behind it for good.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import TrainConfig


@SCENARIOS.register("attention_logit_growth")
class AttentionLogitGrowth(LMScenario):
    spec = ScenarioSpec(
        name="attention_logit_growth",
        healthy=False,
        expected_kind="attention_logit_growth",
        summary="tiny proxy at LR 0.1 without QK-norm: attention logits grow to ~1e4",
        lead_required=True,
        fix="QK-norm",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=300, lr=0.1, seed=seed)

    def fixed(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=300, lr=0.1, qk_norm=True, seed=seed)
