"""Softmax collapse on modular addition, the grokking setting (Prieto et al. 2025).

(a + b) mod 59 with the reference optimizer (AdamW ε = 1e-25) and the softmax in float16: once the training
set is fit, the loss falls below float16's resolution and rows of the softmax collapse to exactly one-hot
(zero loss, zero gradient); the remaining update only scales the weights (cos(g, w) → −1), the loss turns
back up a hundred steps later, and the logits finally blow up into loss spikes. The task and model are in
`keel.harness.scenarios._modular`. The loss degrades against its own best (a float64-softmax reference
differs from the first steps by float16 rounding, which is not the instability).
"""

from __future__ import annotations

import torch

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioResult, ScenarioSpec
from keel.harness.scenarios._modular import P, train

STEPS = 500


@SCENARIOS.register("softmax_collapse")
class SoftmaxCollapse:
    spec = ScenarioSpec(
        name="softmax_collapse",
        healthy=False,
        expected_kind="softmax_collapse",
        summary=f"(a + b) mod {P}, MLP, AdamW ε=1e-25, float16 softmax: rows collapse to one-hot, "
        "then the loss turns up and spikes",
        lead_required=True,
        fix="float64 softmax",
    )

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        return train("softmax_collapse", seed=seed, steps=steps or STEPS, precision=torch.float16, eps=1e-25)

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        return None
