"""Output-logit divergence by naïve loss minimisation: modular multiplication with a standard AdamW.

(a · b) mod 59 on the grokking setup of `keel.harness.scenarios._modular` with an ordinary AdamW (ε = 1e-8)
and a float16 softmax. Once the training set is fit, the optimizer lowers the loss by scaling the logits:
log Z climbs from log 59 ≈ 4 by tens of nats within a few dozen steps — the drift keel must flag — while
the float16 softmax collapses, and the loss turns back up and finally spikes. (At seed 0 keel flags the
softmax collapse at step 28 and the drift at step 40; the loss degrades from step 138.) A z-loss of 1e-4 (PaLM;
Wortsman et al. 2023) anchors log Z and the same run keeps improving (`reference`). The loss degrades
against its own best: the z-loss run reports its penalty in its loss, so the two curves do not compare.

A caveat, honestly: Wortsman et al.'s output-logit divergence appears late in long language-model runs at
large learning rates; keel could not reproduce that in a CPU minute with its byte-level proxy (log Z
stayed within a few nats of log V in every recipe tried), so this scenario shows the same signal — log Z
running away — through the mechanism that does appear at this scale.
"""

from __future__ import annotations

import torch

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioResult, ScenarioSpec
from keel.harness.scenarios._modular import P, train

STEPS = 500


@SCENARIOS.register("output_logit_divergence")
class OutputLogitDivergence:
    spec = ScenarioSpec(
        name="output_logit_divergence",
        healthy=False,
        expected_kind="output_logit_drift",
        summary=f"(a · b) mod {P}, MLP, AdamW ε=1e-8, float16 softmax: log Z runs away once the data is fit",
        lead_required=True,
        fix="z-loss 1e-4",
    )

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        return train(
            "output_logit_divergence", seed=seed, steps=steps or STEPS, precision=torch.float16, eps=1e-8, op="product"
        )

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        return None

    def fixed_run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        """The same run with a z-loss of 1e-4: the fix, for comparison."""
        return train(
            "output_logit_divergence",
            seed=seed,
            steps=steps or STEPS,
            precision=torch.float16,
            eps=1e-8,
            op="product",
            z_loss=1e-4,
        )
