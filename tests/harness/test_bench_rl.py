"""`keel bench rl`: scoring, the rlwatch feed, the CLI contract, a real GRPO loop under Guard, and (slow) each
scenario's quick run reproducing its effect with keel detecting it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from keel._core import keys
from keel.cli import main as keel_main
from keel.guard.console import silenced
from keel.harness.bench import rl as bench
from keel.harness.scenarios.rl import create_rl_scenario, list_rl_scenarios
from keel.harness.scenarios.rl._grpo import COPY_TASK, GRPORecipe, train_grpo
from keel.harness.scenarios.rl._lm import Trace, trailing_mean
from keel.proxy.model import create_proxy_model


def test_the_five_scenarios_are_registered_with_consistent_specs():
    names = list_rl_scenarios()
    assert names == [
        "dpo_displacement",
        "dpo_healthy",
        "grpo_entropy_collapse",
        "grpo_healthy",
        "reward_healthy",
        "reward_overoptimization",
    ]
    for name in names:
        spec = create_rl_scenario(name).spec
        assert spec.name == name and spec.healthy == (spec.expected_kind is None)
        assert spec.healthy or spec.fix, f"{name}: an instability names the remedy it measures"


def test_score_counts_every_alarm_of_a_healthy_run_as_false():
    alarms = [(5, "policy_entropy_collapse", "warning"), (9, "kl_blowup", "critical")]
    s = bench.score(alarms, healthy=True, expected=None, harm_step=None)
    assert (s.detected, s.false_alarms, s.other_alarms) == (None, 2, 0)


def test_score_takes_the_first_alarm_of_the_expected_kind_and_its_lead():
    alarms = [(3, "loss_spike", "warning"), (40, "policy_entropy_collapse", "warning"), (60, "x", "critical")]
    s = bench.score(alarms, healthy=False, expected=("policy_entropy_collapse",), harm_step=75)
    assert (s.detected, s.kind, s.step, s.lead_steps, s.other_alarms) == (True, "policy_entropy_collapse", 40, 35, 2)
    late = bench.score(alarms, healthy=False, expected=("x",), harm_step=50)
    assert late.lead_steps == -10  # after the harm: a negative lead, reported as such
    missed = bench.score(alarms[:1], healthy=False, expected=("policy_entropy_collapse",), harm_step=75)
    assert (missed.detected, missed.step, missed.lead_steps) == (False, None, None)


def test_score_says_when_a_monitor_has_no_rule_for_the_kind():
    s = bench.score([(3, "grad_norm_spike", "warning")], healthy=False, expected=(), harm_step=10)
    assert s.detected is None and s.other_alarms == 1


def test_rlwatch_sees_the_trace_under_its_own_names_and_finds_an_entropy_collapse():
    trace = Trace()
    for step in range(80):
        entropy = 2.0 if step < 30 else 0.5  # rlwatch's rule: < 1.0 nats for 25 steps (after 20 of warm-up)
        signals = {keys.RL_ENTROPY: torch.tensor(entropy), keys.RL_REWARD_MEAN: torch.tensor(0.5)}
        trace.add(torch.tensor(0.1), torch.tensor(1.0), signals)
    alarms = bench.rlwatch_alarms(trace)
    entropy = [a for a in alarms if a[1] == "entropy_collapse"]
    assert entropy and entropy[0][2] == "warning" and 30 + 25 // 2 - 1 <= entropy[0][0] <= 30 + 25


def test_trailing_mean_is_the_mean_of_the_last_window_values():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_unknown_scenario_names_the_allowed():
    with pytest.raises(ValueError, match="allowed: .*grpo_healthy"):
        bench.bench_rl(["nope"])


@pytest.mark.parametrize("argv", [["--only", "nope"], ["--threads", "0"], ["--seed", "-1"]])
def test_bad_arguments_get_one_error_line_and_exit_2(argv, capsys):
    assert keel_main(["bench", "rl", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keel bench rl: error:")


def test_a_grpo_loop_under_guard_logs_the_policy_signals_every_step():
    torch.manual_seed(0)
    model = create_proxy_model("tiny")
    with silenced():
        result = train_grpo(
            model, COPY_TASK, GRPORecipe(rollouts=2, lr=1e-3, groups=2, group_size=4, inner=2), seed=0, guarded=True
        )
    assert len(result.trace.steps) == 4  # rollouts × inner optimizer steps, each one guard.step
    for row in result.trace.steps:
        for key in (keys.RL_ENTROPY, keys.RL_REWARD_MEAN, keys.RL_ZERO_STD_GROUPS, keys.RL_CLIP_HIGH, "loss"):
            assert math.isfinite(row[key]), key
        assert keys.RL_KL not in row  # β = 0: no reference, no KL (as TRL logs it)


# --- the scenarios' quick runs: each reproduces its effect and keel names it (slow: ~10-40 s each) ------------
def _quick(name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `keel bench rl` runs them: tiny models, and more threads contend on a busy machine
    try:
        return bench.score_scenario(name, quick=True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_dpo_on_near_identical_pairs_displaces_the_chosen_response_and_the_anchor_holds_it():
    s = _quick("dpo_displacement")
    assert s.keel.detected and s.keel.kind == "likelihood_displacement"
    assert s.effect["without"] < -1.0 < 0 < s.effect["with"]["sft_regularizer_alpha_1"]
    assert s.rlwatch.detected is None  # rlwatch has no preference rule


@pytest.mark.slow
def test_healthy_runs_have_no_warning():
    for name in ("dpo_healthy", "grpo_healthy"):
        s = _quick(name)
        assert s.passed and s.keel.false_alarms == 0, (name, s.keel.alarms)


@pytest.mark.slow
def test_grpo_at_a_too_high_lr_collapses_entropy_and_keel_warns_before_the_reward_stalls():
    s = _quick("grpo_entropy_collapse")
    assert s.keel.kind == "policy_entropy_collapse" and s.keel.lead_steps is not None and s.keel.lead_steps > 0
    assert s.effect["without"]["entropy"] < 0.15  # from ~1.1 nats at the start


@pytest.mark.slow
def test_optimising_one_proxy_rm_raises_it_while_the_gold_reward_falls_and_keel_names_it():
    # No lead is asserted: with rise_factor 1.3 (1.1 gave warnings on 9 of 200 healthy synthetic series) the quick
    # run's warning comes after the gold peak; BENCHMARKS.md "keel bench rl" says so.
    s = _quick("reward_overoptimization")
    assert s.keel.detected and s.keel.kind == "reward_overoptimization"
    assert s.effect["without"]["drop"] > 0.2


@pytest.mark.slow
def test_json_output_has_keel_and_rlwatch_side_by_side(capsys):
    assert keel_main(["bench", "rl", "--quick", "--only", "grpo_healthy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    row = out["scenarios"][0]
    for monitor in ("keel", "rlwatch"):
        assert {"detected", "kind", "step", "lead_steps", "false_alarms", "other_alarms"} <= set(row[monitor])
    assert {"effect", "harm_step", "remedy", "passed"} <= set(row)
