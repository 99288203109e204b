"""Healthy run with noisy evals: one task, its held-out accuracy measured on a fresh small sample each time.

The `task_switch` recipe (`_continual`) without the switch: the MLP trains on task A for 300 steps, one phase,
and ``eval/A`` is the accuracy on 64 examples drawn afresh at every evaluation (every 2 steps), so it moves by
several points from one evaluation to the next (a binomial spread of ~0.03 around ~0.95, and larger early on)
with no change of the model behind it. Noisy evals that only fluctuate are no stability gap: no warning or
critical finding may appear.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios._continual import ContinualConfig, ContinualResult, train_continual

STEPS, EVAL_EXAMPLES = 300, 64


@SCENARIOS.register("noisy_eval_finetune")
class NoisyEvalFinetune:
    spec = ScenarioSpec(
        name="noisy_eval_finetune",
        healthy=True,
        expected_kind=None,
        summary=f"MLP on one task, its accuracy evaluated on {EVAL_EXAMPLES} fresh held-out examples every 2 "
        "steps: evals that only fluctuate",
    )
    event_step = None

    def config(self, seed: int, steps: int | None = None) -> ContinualConfig:
        return ContinualConfig(
            steps=steps or STEPS, switch_step=None, eval_examples=EVAL_EXAMPLES, eval_resample=True, seed=seed
        )

    def run(self, *, seed: int = 0, steps: int | None = None) -> ContinualResult:
        return train_continual(self.config(seed, steps), name=self.spec.name)

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        return None
