"""A healthy fp16 run with a dynamic loss scale: the GradScaler's benign sawtooth must raise nothing.

`loss_scale_thrash`'s MLP and GradScaler (growth interval 25) with targets that do not drift: the scale doubles
every 25 clean steps (2¹⁶ → 2²² by step 150 at seed 0) and backs off on the overflow that probing up causes, a few
times in 300 steps, each the scaler's normal overflow (``info``), never a warning.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioResult, ScenarioSpec
from keel.harness.scenarios._fp16 import train_fp16

STEPS = 300


@SCENARIOS.register("fp16_scaler_healthy")
class Fp16ScalerHealthy:
    spec = ScenarioSpec(
        name="fp16_scaler_healthy",
        healthy=True,
        expected_kind=None,
        summary="fp16 MLP with a GradScaler (growth interval 25): the scale grows and backs off, as designed",
    )

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        return train_fp16(self.spec.name, seed=seed, steps=steps or STEPS)

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        return None
