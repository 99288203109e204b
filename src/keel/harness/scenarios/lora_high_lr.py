"""LoRA at too high a learning rate: peft adapters on the pre-trained tiny proxy, warmed up to an LR 17× the sane one.

`_lora.lora_finetune` with AdamW warmed up linearly over 60 steps to LR 5e-2 (the healthy peft scenario uses 3e-3):
as the LR climbs, each adapter's update ΔW = (α/r)·B·A grows by several per cent of its base weight per step,
the adapters outgrow the weights they adapt, and the loss leaves the reference run's (the same recipe at 3e-3)
and then jumps (seed 0: ~1.5 to ~3 near step 45), ending far above where it started. keel should name it
``lora_blowup``. `lora_finetune` is also the place to compare optimizers on this recipe (``optimizer=``).
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioResult, ScenarioSpec
from keel.harness.scenarios._lora import lora_finetune

LR, SANE_LR, WARMUP, STEPS = 5e-2, 3e-3, 60, 120


@SCENARIOS.register("lora_high_lr")
class LoraHighLR:
    spec = ScenarioSpec(
        name="lora_high_lr",
        healthy=False,
        expected_kind="lora_blowup",
        summary=f"peft LoRA (r 8, α 16) on the pre-trained tiny proxy, warmed up over {WARMUP} steps to LR {LR:g}: "
        "the adapters outgrow their base weights and the loss climbs",
        fix=f"LR {SANE_LR:g}",
    )

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        run = lora_finetune(seed=seed, lr=LR, steps=steps or STEPS, warmup=WARMUP)
        return ScenarioResult(name=self.spec.name, losses=run.losses, findings=run.findings, wall_s=run.wall_s)

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        return lora_finetune(seed=seed, lr=SANE_LR, steps=steps or STEPS, warmup=WARMUP, guarded=False).losses
