"""Healthy GRPO: `grpo_entropy_collapse`'s copy task at a sane learning rate (1e-4) with clip-higher.

The reward rises from ~0.4 towards 0.9 over the run while the entropy falls gradually, as a policy that learns a
task with one right answer must. No warning or critical finding may appear.
"""

from __future__ import annotations

import time

from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios.rl import RL_SCENARIOS
from keel.harness.scenarios.rl._grpo import COPY_FULL, COPY_QUICK, COPY_TASK, GRPORecipe, copy_start, train_grpo
from keel.harness.scenarios.rl._lm import RLRun
from keel.harness.scenarios.rl.grpo_entropy_collapse import METRIC, arm_figures

SANE_LR = 1e-4


@RL_SCENARIOS.register("grpo_healthy")
class GRPOHealthy:
    spec = ScenarioSpec(
        name="grpo_healthy",
        healthy=True,
        expected_kind=None,
        summary=f"GRPO on the copy task at lr {SANE_LR}, clip 0.2/0.28: the reward rises, the entropy falls gradually",
    )

    def run(self, *, seed: int = 0, quick: bool = False) -> RLRun:
        setting = COPY_QUICK if quick else COPY_FULL
        start = time.perf_counter()
        model = copy_start(seed, setting)
        recipe = GRPORecipe(rollouts=setting.rollouts, lr=SANE_LR, eps_high=0.28)
        result = train_grpo(model, COPY_TASK, recipe, seed=seed, guarded=True)
        return RLRun(
            name=self.spec.name,
            trace=result.trace,
            findings=result.findings,
            wall_s=time.perf_counter() - start,
            effect={"metric": METRIC, "without": arm_figures(result.trace), "with": {}},
        )
