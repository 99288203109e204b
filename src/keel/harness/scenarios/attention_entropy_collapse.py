"""Attention-entropy collapse at a moderately high learning rate (Zhai et al. 2023).

keel's tiny proxy at peak LR 0.03 (AdamW, no weight decay): the mean attention entropy falls from its
uniform 3.2 nats to below 10 % of it while the logits grow to several hundred — below the critical level
of the logit-growth detector, so the collapse of the attention itself is what names it. The reference
adds QK-norm (σReparam, the paper's fix, bounds the same logits through the spectral norm).
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import TrainConfig


@SCENARIOS.register("attention_entropy_collapse")
class AttentionEntropyCollapse(LMScenario):
    spec = ScenarioSpec(
        name="attention_entropy_collapse",
        healthy=False,
        expected_kind="attention_entropy_collapse",
        summary="tiny proxy at LR 0.03: mean attention entropy collapses below 10 % of uniform",
        fix="QK-norm",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=300, lr=0.03, seed=seed)

    def fixed(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=300, lr=0.03, qk_norm=True, seed=seed)
