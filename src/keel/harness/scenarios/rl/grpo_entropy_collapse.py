"""Entropy collapse: GRPO at a learning rate ten times too high makes the policy deterministic within tens of steps.

The tiny proxy LM, SFT'd to copy a 3-letter string from its prompt (~40% exact), is trained with GRPO
(`_grpo.train_grpo`: 16 prompts × 8 samples per rollout, 4 optimizer steps per rollout, exact-match reward, the
symmetric clip ε 0.2) at AdamW 3e-3, ten times `grpo_healthy`'s rate. Its token entropy falls to a tenth of its start
while the reward is still rising; once the policy stops exploring, most groups score all-equal and the reward
plateaus. keel should report ``policy_entropy_collapse`` before the reward stalls (lead time). Remedy measured:
DAPO's clip-higher (ε_high 0.28) at the same rate, with each run's clip shares to show the clip did bind.

Clip-higher does not keep the entropy up here, and not for want of a task with many right answers: on tasks where
every prompt accepts many responses (any letters of a given set, any lowercase bytes, any digits with a given sum),
with 4 to 16 optimizer steps per rollout, a dominant token starting above 1/(1 + ε) (where the upper clip cannot
bind on it, DAPO's premise) and ε_high up to 1.0, its last-quarter entropy stayed within the spread between seeds
of the symmetric clip's, while the clip held ~2-10% of the positively advantaged tokens (issue 16, 2026-12-06); its
reward moved either way. The looser bound speeds the sharpening as much as the exploration, and once most groups
score alike no gradient moves the entropy either way.

References:
    Yu et al. 2025, "DAPO", arXiv 2503.14476 (entropy collapse, clip-higher). Cui et al. 2025, arXiv 2505.22617.
"""

from __future__ import annotations

import time

from keel._core import keys
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios.rl import RL_SCENARIOS
from keel.harness.scenarios.rl._grpo import COPY_FULL, COPY_QUICK, COPY_TASK, GRPORecipe, copy_start, train_grpo
from keel.harness.scenarios.rl._lm import RLRun, Trace, trailing_mean

HIGH_LR = 3e-3
# Harm: the reward stalls — the first step whose trailing mean (4 rollouts) is within STALL_GAP of the best it reaches.
STALL_WINDOW, STALL_GAP = 16, 0.03
METRIC = (
    "policy entropy (nats) and reward, means over the last quarter of the steps; clip_low / clip_high: the share of "
    "response tokens whose ratio the clip held (1 − ε_low with A < 0 / 1 + ε_high with A > 0), mean over all steps"
)


def stall_step(trace: Trace) -> int:
    """The first step whose trailing-mean reward is within ``STALL_GAP`` of the run's best trailing mean."""
    reward = trailing_mean(trace.series(keys.RL_REWARD_MEAN), STALL_WINDOW)
    best = max(reward)
    return next(i for i, r in enumerate(reward) if r >= best - STALL_GAP)


def last_quarter(trace: Trace, key: str) -> float:
    values = trace.series(key)
    tail = values[-max(1, len(values) // 4) :]
    return round(sum(tail) / len(tail), 4)


def arm_figures(trace: Trace) -> dict[str, float]:
    """One run's figures: entropy and reward over its last quarter, and its clip shares over the whole run.

    The clip shares say whether clip-higher had anything to act on: it changes the update only on the tokens whose
    ratio passed 1 + 0.2 with a positive advantage. They are averaged over every step, because the clip binds while
    groups still have mixed rewards, early in the run, and hardly at all once most groups score alike.
    """

    def run_mean(key: str) -> float:
        values = trace.series(key)
        return round(sum(values) / len(values), 4)

    return {
        "entropy": last_quarter(trace, keys.RL_ENTROPY),
        "reward": last_quarter(trace, keys.RL_REWARD_MEAN),
        "clip_low": run_mean(keys.RL_CLIP_LOW),
        "clip_high": run_mean(keys.RL_CLIP_HIGH),
    }


@RL_SCENARIOS.register("grpo_entropy_collapse")
class GRPOEntropyCollapse:
    spec = ScenarioSpec(
        name="grpo_entropy_collapse",
        healthy=False,
        expected_kind="policy_entropy_collapse",
        summary=f"GRPO on a copy task at lr {HIGH_LR} (10x too high), 4 steps per rollout, clip 0.2/0.2: entropy "
        "collapses, then the reward stalls",
        lead_required=True,
        fix="clip-higher eps_high=0.28",
    )

    def run(self, *, seed: int = 0, quick: bool = False) -> RLRun:
        setting = COPY_QUICK if quick else COPY_FULL
        start = time.perf_counter()
        model = copy_start(seed, setting)
        recipe = GRPORecipe(rollouts=setting.rollouts, lr=HIGH_LR)
        plain = train_grpo(model, COPY_TASK, recipe, seed=seed, guarded=True)
        higher = GRPORecipe(rollouts=setting.rollouts, lr=HIGH_LR, eps_high=0.28)
        clipped = train_grpo(model, COPY_TASK, higher, seed=seed, guarded=False)
        return RLRun(
            name=self.spec.name,
            trace=plain.trace,
            findings=plain.findings,
            wall_s=time.perf_counter() - start,
            harm_step=stall_step(plain.trace),
            harm=f"the reward stalls: its {STALL_WINDOW}-step mean within {STALL_GAP} of the run's best",
            effect={
                "metric": METRIC,
                "without": arm_figures(plain.trace),
                "with": {"clip_higher_0.28": arm_figures(clipped.trace)},
            },
        )
