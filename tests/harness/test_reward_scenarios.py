"""The reward over-optimisation scenario and its healthy control, quick runs (slow: ~1-2 min each on one thread):
keel's unconfirmed-gain rule warns before the gold reward peaks on the one, and nothing warns on the other."""

from __future__ import annotations

import pytest
import torch

from keel.harness.bench import rl as bench


def _quick(name: str, seed: int) -> bench.RLScore:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `keel bench rl` runs them
    try:
        return bench.score_scenario(name, seed=seed, quick=True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_one_proxy_is_over_optimised_and_keel_warns_before_the_gold_reward_peaks():
    s = _quick("reward_overoptimization", seed=0)
    assert s.keel.kind == "reward_overoptimization" and s.keel.lead_steps is not None and s.keel.lead_steps > 0
    assert s.keel.alarms[0][2] == "warning"
    assert s.effect["without"]["drop"] > 0.2  # the gold reward peaks and falls


@pytest.mark.slow
def test_grpo_on_the_gold_reward_with_the_ensemble_logged_has_no_warning():
    s = _quick("reward_healthy", seed=0)
    assert s.passed and s.keel.false_alarms == 0, s.keel.alarms
    assert s.effect["without"]["end"] > s.effect["without"]["peak"] - 0.1  # the gold reward is still at its best
