"""Healthy run with a warm-up bump: a short warm-up to a high (but QK-normed) learning rate.

keel's tiny proxy with QK-norm at peak LR 0.02 reached in 5 steps: the loss falls, bumps back up for a
few steps while Adam's second moments settle, then trains normally. Warm-up bumps are routine; no warning
or critical finding may appear.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import TrainConfig


@SCENARIOS.register("warmup_bump")
class WarmupBump(LMScenario):
    spec = ScenarioSpec(
        name="warmup_bump",
        healthy=True,
        expected_kind=None,
        summary="tiny proxy with QK-norm, 5-step warm-up to LR 0.02: the loss bumps early",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=250, lr=0.02, warmup=5, qk_norm=True, seed=seed)
