"""The GRPO entropy-collapse scenario's figures: each arm's entropy and reward over the last quarter, and how often
its ratio clip bound (low and high side), so `keel bench rl` shows whether clip-higher had anything to act on."""

from __future__ import annotations

import pytest
import torch

from keel._core import keys
from keel.guard.console import silenced
from keel.harness.scenarios.rl import create_rl_scenario
from keel.harness.scenarios.rl._lm import Trace
from keel.harness.scenarios.rl.grpo_entropy_collapse import arm_figures


def _trace(entropy, reward, clip_low, clip_high):
    trace = Trace()
    for row in zip(entropy, reward, clip_low, clip_high, strict=True):
        signals = {
            k: torch.tensor(v)
            for k, v in zip(
                (keys.RL_ENTROPY, keys.RL_REWARD_MEAN, keys.RL_CLIP_LOW, keys.RL_CLIP_HIGH), row, strict=True
            )
        }
        trace.add(torch.tensor(0.0), torch.tensor(1.0), signals)
    return trace


def test_arm_figures_report_the_clip_shares_over_the_whole_run_beside_last_quarter_entropy_and_reward():
    # 8 steps: the last quarter is steps 6-7; the clip binds early (mixed groups), not at the end
    trace = _trace(
        entropy=[1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.3],
        reward=[0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.0, 0.8],
        clip_low=[0.0, 0.04, 0.0, 0.04, 0.0, 0.0, 0.0, 0.0],
        clip_high=[0.0, 0.08, 0.0, 0.08, 0.0, 0.0, 0.0, 0.0],
    )
    figures = arm_figures(trace)
    assert figures == pytest.approx({"entropy": 0.2, "reward": 0.9, "clip_low": 0.01, "clip_high": 0.02})


def test_arm_figures_of_a_run_whose_clip_never_bound_say_zero():
    trace = _trace(entropy=[1.0] * 4, reward=[0.5] * 4, clip_low=[0.0] * 4, clip_high=[0.0] * 4)
    assert arm_figures(trace)["clip_low"] == arm_figures(trace)["clip_high"] == 0.0


@pytest.mark.slow
def test_the_collapse_runs_clip_binds_on_both_sides_so_clip_higher_has_tokens_to_act_on():
    # 4 optimizer steps per rollout at lr 3e-3: the ratio leaves 1 after the first step and the clip holds some
    # tokens on each side, in the symmetric run and in the clip-higher one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `keel bench rl` runs it
    try:
        with silenced():
            run = create_rl_scenario("grpo_entropy_collapse").run(quick=True)
    finally:
        torch.set_num_threads(threads)
    plain, higher = run.effect["without"], run.effect["with"]["clip_higher_0.28"]
    assert plain["clip_low"] > 0 and plain["clip_high"] > 0
    assert higher["clip_low"] > 0 and higher["clip_high"] > 0
