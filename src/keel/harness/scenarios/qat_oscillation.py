"""Weight oscillation in quantization-aware training (OFQ, Liu et al. 2023, arXiv 2302.02210).

keel's tiny proxy with 3-bit StatsQ weights (every linear layer but the output head) at a constant LR 1e-2 after a
20-step warm-up, no cool-down: AdamW moves each latent weight by about the LR per step, a sizeable part of the
3-bit grid's step, so the weights next to a rounding boundary keep crossing it back and forth. The share of a
layer's weights reversing their integer code more than once per 50 steps climbs past 40 % within ~150 steps
(seed 0: 0.41 at step 150, 0.63 at 300). keel should name it ``qat_oscillation``. The reference is the same recipe
with confidence-guided annealing (CGA, BR 0.005) over the last 30 % of the steps, which drives the share towards 0.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios._qat import QatScenario, statsq_3bit
from keel.proxy.trainer import TrainConfig

LR, STEPS = 1e-2, 300


@SCENARIOS.register("qat_oscillation")
class QatOscillation(QatScenario):
    spec = ScenarioSpec(
        name="qat_oscillation",
        healthy=False,
        expected_kind="qat_oscillation",
        summary=f"tiny proxy, 3-bit StatsQ weights, constant LR {LR:g}: quantized weights flip between two codes",
        fix="confidence-guided annealing over the last 30 % of the steps",
    )
    cga_step = int(0.7 * STEPS)

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=STEPS, lr=LR, min_lr_ratio=1.0, model_fn=statsq_3bit, seed=seed)
