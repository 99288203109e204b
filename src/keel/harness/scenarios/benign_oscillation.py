"""Healthy run with benign oscillation: a large constant learning rate that is still stable.

keel's tiny proxy with QK-norm at a constant LR of 0.01 (no decay) and small batches: the loss oscillates
visibly around a slowly falling level — the large-LR regime that helps rather than hurts (Lu et al.,
"Benign Oscillation of SGD with Large Learning Rates"). No warning or critical finding may appear.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import TrainConfig


@SCENARIOS.register("benign_oscillation")
class BenignOscillation(LMScenario):
    spec = ScenarioSpec(
        name="benign_oscillation",
        healthy=True,
        expected_kind=None,
        summary="tiny proxy with QK-norm at a constant LR 0.01, batch 8: the loss oscillates",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=250, lr=0.01, min_lr_ratio=1.0, batch_size=8, qk_norm=True, seed=seed)
