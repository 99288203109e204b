"""The zoo's MoE scenarios: wired to the MoE proxy, the router probe and the MoE detectors; named right in full.

The full runs (`keel bench detect --only moe_...`, figures in BENCHMARKS.md) are slow; the default checks cover the
wiring and the recipes' MoE settings.
"""

from __future__ import annotations

import math

import pytest
import torch

from keel.harness.bench.detect import score_scenario
from keel.harness.scenarios import create_scenario
from keel.harness.scenarios._moe import moe_detectors, moe_probes
from keel.proxy.moe import MoeConfig

MOE_SCENARIOS = {
    "moe_router_logit_growth": "router_logit_growth",
    "moe_load_collapse": "load_collapse",
    "moe_healthy": None,
}


def test_moe_scenarios_train_the_moe_proxy_and_fix_what_they_break() -> None:
    for name, kind in MOE_SCENARIOS.items():
        scenario = create_scenario(name)
        assert scenario.spec.expected_kind == kind
        assert isinstance(scenario.recipe(0).moe, MoeConfig)
    growth, collapse = create_scenario("moe_router_logit_growth"), create_scenario("moe_load_collapse")
    assert growth.recipe(0).moe.router_z_loss == 0 and growth.fixed(0).moe.router_z_loss == 1e-3
    assert collapse.recipe(0).moe.aux_loss == 0 and collapse.fixed(0).moe.aux_loss == 1e-2
    assert growth.recipe(0).qk_norm  # attention-logit growth, at the same LR, kept out of it


def test_moe_scenarios_watch_the_routers_with_the_moe_detectors_once() -> None:
    assert moe_probes().count("router") == 1 and "attn_logits" in moe_probes()
    kinds = [type(d).__name__ for d in moe_detectors()]
    for moe in ("RouterLogitGrowthDetector", "LoadCollapseDetector", "DeadExpertsDetector"):
        assert kinds.count(moe) == 1, kinds


@pytest.mark.slow
def test_a_short_moe_scenario_run_trains_on_one_thread_and_restores_the_thread_count() -> None:
    threads = torch.get_num_threads()
    result = create_scenario("moe_healthy").run(steps=3)
    assert torch.get_num_threads() == threads
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert not [f for f in result.findings if f.kind == "keel_error"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(MOE_SCENARIOS))
def test_moe_scenario_is_named_with_its_kind_and_the_healthy_run_raises_nothing(name: str, seed: int) -> None:
    score = score_scenario(name, seed=seed, reference=False)
    assert score.passed, (name, seed, score.alarms)
