"""Slow divergence: a warm-up that never ends — the LR keeps growing 1.25 % per step from step 40.

keel's tiny proxy with QK-norm (so attention logits are not the story) at LR 3e-3, whose schedule keeps
multiplying the LR by 1.0125 per step from step 40 (a warm-up configured with the wrong number of steps):
the loss improves, levels off near 2.5, creeps up to ~2.85 over a hundred steps as the LR passes ~0.3,
then runs away. keel's divergence detector must call it once the running median stays well above its
best, before the run is lost.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import TrainConfig

RAMP_START = 40
RATE = 1.0125


def ramp(step: int) -> float:
    return RATE ** max(0, step - RAMP_START)


@SCENARIOS.register("slow_divergence")
class SlowDivergence(LMScenario):
    spec = ScenarioSpec(
        name="slow_divergence",
        healthy=False,
        expected_kind="divergence",
        summary=f"tiny proxy with QK-norm whose LR grows {RATE - 1:.2%}/step from step {RAMP_START}",
        fix="a schedule that ends its warm-up",
    )
    event_step = RAMP_START

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=520, lr=3e-3, min_lr_ratio=1.0, lr_factor=ramp, qk_norm=True, seed=seed)

    def fixed(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=520, lr=3e-3, min_lr_ratio=1.0, qk_norm=True, seed=seed)
