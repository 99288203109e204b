"""Healthy peft LoRA fine-tune: B grows from zero, the adapters learn, the loss falls; no warning may appear.

`_lora.lora_finetune` at LR 3e-3 (warm-up 10): peft LoRA adapters (r 8, α 16) on every block linear of the
pre-trained tiny proxy, 24 held-out snippets in batches of four, 30 epochs of 6 steps. Every B starts at zero, so
each adapter's ‖ΔW‖ rises from 0 — fastest in the first steps — to about half of its base weight's norm, and the
per-step loss swings between batches as it falls (~1.9 to ~0.8): the early growth that a naive "adapter norm is
growing" rule mistakes for a blow-up.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioResult, ScenarioSpec
from keel.harness.scenarios._lora import lora_finetune

LR, STEPS = 3e-3, 180


@SCENARIOS.register("lora_finetune")
class LoraFinetune:
    spec = ScenarioSpec(
        name="lora_finetune",
        healthy=True,
        expected_kind=None,
        summary=f"peft LoRA (r 8, α 16) on the pre-trained tiny proxy at LR {LR:g}, {STEPS} steps: ‖ΔW‖ grows "
        "from zero as it should",
    )

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        run = lora_finetune(seed=seed, lr=LR, steps=steps or STEPS)
        return ScenarioResult(name=self.spec.name, losses=run.losses, findings=run.findings, wall_s=run.wall_s)

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        return None
