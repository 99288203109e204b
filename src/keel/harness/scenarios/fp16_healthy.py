"""A healthy float16 mixed-precision run: `fp16_overflow`'s recipe at LR 0.01 — its activations grow, and stay far
from fp16's max.

The tiny proxy under CPU autocast in float16, constant LR 0.01 after warm-up, no weight decay, QK-norm: the largest
block output rises from 0.2 to ~100 in 100 steps (the fast growth from initialisation) and keeps creeping (~170 by
step 300, ×1.003 per step) — still more than 8 doublings below 65504. Activation growth must not be flagged here.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.harness.scenarios.fp16_overflow import fp16_recipe
from keel.proxy.trainer import TrainConfig


@SCENARIOS.register("fp16_healthy")
class Fp16Healthy(LMScenario):
    spec = ScenarioSpec(
        name="fp16_healthy",
        healthy=True,
        expected_kind=None,
        summary="tiny proxy under fp16 autocast at constant LR 0.01: activations creep up, far below 65504",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return fp16_recipe(seed, lr=0.01)
