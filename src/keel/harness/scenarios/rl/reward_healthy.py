"""Healthy control of `reward_overoptimization`: GRPO on the gold reward itself, the proxy ensemble logged.

The same base policy, prompts and five standardised proxy reward models as the over-optimisation scenario, but the
policy is trained on the gold reward (``rl/reward_mean`` is the gold reward), so there is nothing to over-optimise:
the gold reward rises and the ensemble's statistics (``rm/…``) are logged as they would be beside any reward. A
detector that warns here is reading the policy's movement, not a reward model's error. No warning or critical
finding may appear. It runs at ``LR`` 2e-4, below the over-optimisation run's 5e-4, because a policy trained on
the gold reward sharpens too: its token entropy fell 2.6 → 0.7 nats by step ~100 at 5e-4 (seeds 0 and 2) and
2.9 → 0.6 by step 150 at 3e-4 (seed 2), which keel reports as ``policy_entropy_collapse`` — another instability,
not a healthy run. At 2e-4 seeds 0-2 had no finding of any kind in 150 rollouts. (The reward detector itself was
silent on all three seeds at 3e-4 too; at 5e-4 its unconfirmed-gain rule warned late, at steps 113 and 148 of
seeds 0 and 1, after the entropy had collapsed and the ensemble's mean fell while the gold reward rose.)
"""

from __future__ import annotations

import time

from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios.rl import RL_SCENARIOS
from keel.harness.scenarios.rl._grpo import GRPORecipe, train_grpo
from keel.harness.scenarios.rl._lm import RLRun, base_model
from keel.harness.scenarios.rl.reward_overoptimization import METRIC, EnsembleTask, gold_curve, reward_models

LR = 2e-4


@RL_SCENARIOS.register("reward_healthy")
class RewardHealthy:
    spec = ScenarioSpec(
        name="reward_healthy",
        healthy=True,
        expected_kind=None,
        summary=f"GRPO on the gold reward at lr {LR}, the 5 proxy RMs' ensemble logged: the gold reward rises, "
        "nothing is over-optimised",
    )

    def run(self, *, seed: int = 0, quick: bool = False) -> RLRun:
        rollouts = 90 if quick else 150
        start = time.perf_counter()
        policy = base_model(seed, 300)
        gold, proxies = reward_models(policy, seed)
        recipe = GRPORecipe(rollouts=rollouts, lr=LR, groups=8, inner=1)
        result = train_grpo(policy, EnsembleTask(gold, proxies, "gold").task(), recipe, seed=seed, guarded=True)
        return RLRun(
            name=self.spec.name,
            trace=result.trace,
            findings=result.findings,
            wall_s=time.perf_counter() - start,
            effect={"metric": METRIC, "without": gold_curve(result.trace), "with": {}},
        )
