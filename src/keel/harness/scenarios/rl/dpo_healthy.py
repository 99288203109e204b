"""Healthy DPO: the same recipe as `dpo_displacement` on ordinary pairs, whose rejected response is another text.

Pairs whose rejected response is 16 bytes from elsewhere in the corpus (`_dpo.corpus_pairs` "distinct"): the margin
grows by pushing the rejected responses down, and the chosen responses keep their likelihood. No warning or
critical finding may appear.
"""

from __future__ import annotations

import time

from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios.rl import RL_SCENARIOS
from keel.harness.scenarios.rl._dpo import FULL, QUICK, DPORecipe, sft_start, train_dpo
from keel.harness.scenarios.rl._lm import RLRun
from keel.harness.scenarios.rl.dpo_displacement import METRIC

HEALTHY_LR = 2.5e-5


@RL_SCENARIOS.register("dpo_healthy")
class DPOHealthy:
    spec = ScenarioSpec(
        name="dpo_healthy",
        healthy=True,
        expected_kind=None,
        summary=f"DPO (β 0.5, lr {HEALTHY_LR}) on ordinary pairs (rejected = another corpus text): the chosen "
        "likelihood holds",
    )

    def run(self, *, seed: int = 0, quick: bool = False) -> RLRun:
        setting = QUICK if quick else FULL
        start = time.perf_counter()
        model, pairs = sft_start(seed, "distinct", setting)
        result = train_dpo(model, pairs, DPORecipe(steps=setting.dpo_steps, lr=HEALTHY_LR), seed=seed, guarded=True)
        return RLRun(
            name=self.spec.name,
            trace=result.trace,
            findings=result.findings,
            wall_s=time.perf_counter() - start,
            effect={"metric": METRIC, "without": round(result.chosen_end - result.chosen_start, 3), "with": {}},
        )
