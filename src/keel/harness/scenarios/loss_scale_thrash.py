"""Loss-scale thrash: fp16 regression targets that keep growing, so the GradScaler backs off again and again.

An MLP regressing a fixed teacher under fp16 autocast with a ``torch.amp.GradScaler("cpu")`` (growth interval 25,
`keel.harness.scenarios._fp16`). From step 100 the targets grow ×1.05 per step — unnormalised targets drifting, as
value targets do when returns grow — and the gradients with them: the scaler overflows every few steps instead of
once per growth interval and its scale sinks by halvings (2²⁰ → 2⁹ in 120 steps at seed 0). The loss rises with
the targets, so divergence is named too; the scaler's fall is what ``loss_scale_thrash`` names. The fix is to
normalise the targets: the reference run trains on the targets without the drift.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioResult, ScenarioSpec
from keel.harness.scenarios._fp16 import train_fp16

ONSET = 100
GROWTH = 1.05
STEPS = 220


def drifting_targets(step: int) -> float:
    return GROWTH ** max(0, step - ONSET)


@SCENARIOS.register("loss_scale_thrash")
class LossScaleThrash:
    spec = ScenarioSpec(
        name="loss_scale_thrash",
        healthy=False,
        expected_kind="loss_scale_thrash",
        summary=f"fp16 MLP with a GradScaler; regression targets grow ×{GROWTH:g}/step from step {ONSET}: "
        "overflows far more often than growths",
        fix="normalised targets",
    )

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        result = train_fp16(self.spec.name, seed=seed, steps=steps or STEPS, target_growth=drifting_targets)
        result.event_step = ONSET
        return result

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        return train_fp16(self.spec.name, seed=seed, steps=steps or STEPS).losses
