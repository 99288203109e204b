"""The continual scenarios: a task switch with replay reproduces the stability gap, keel names it with its depth, and
the continual metrics keel records match a hand computation from the recorded evals; one task with noisy evals is
silent. Cheap configs of the zoo's recipes (the full runs: `keel bench detect --only task_switch --only
noisy_eval_finetune`, figures in BENCHMARKS.md)."""

from __future__ import annotations

import statistics

import pytest
import torch

from keel._core import keys
from keel.harness.scenarios import create_scenario
from keel.harness.scenarios._continual import ContinualConfig, GaussianClasses, train_continual
from keel.store import RunReader

SWITCH = 40
CHEAP = {"steps": 80, "switch_step": SWITCH, "eval_examples": 200}  # the zoo's recipe, the switch 110 steps sooner


@pytest.fixture(scope="module")
def gap_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("task_switch") / "run"
    result = train_continual(ContinualConfig(**CHEAP), name="task_switch", run_dir=str(run_dir), event_step=SWITCH)
    return result, run_dir


def test_task_switch_reproduces_the_gap_a_collapse_of_task_a_right_after_the_switch_then_recovery(gap_run):
    result, _ = gap_run
    a = result.evals["A"]
    level = statistics.median(v for s, v in a if s < SWITCH)
    after = [v for s, v in a if s >= SWITCH]
    low = min(after)
    assert level > 0.9  # task A was learnt
    assert level - low > 0.25  # the collapse
    assert after.index(low) < 10  # within 20 steps of the switch (evals every 2 steps)
    assert after[-1] - low > 0.2  # and the recovery (replay pulls it back)
    assert [v for s, v in result.evals["B"] if s >= SWITCH][-1] > 0.85  # task B is learnt meanwhile


def test_task_switch_gap_is_named_stability_gap_after_the_switch_with_its_depth_from_the_recorded_evals(gap_run):
    result, _ = gap_run
    assert [f for f in result.alarms() if f.kind != "stability_gap"] == []  # no loss spike at the switch either
    [warning] = [f for f in result.alarms() if f.kind == "stability_gap"]
    assert SWITCH <= warning.step <= SWITCH + 20
    a = dict(result.evals["A"])
    before = [v for s, v in sorted(a.items()) if s < SWITCH][-3:]  # the detector's level: median of the last 3
    so_far = min(v for s, v in a.items() if SWITCH <= s <= warning.step)
    assert warning.evidence["value_before"] == pytest.approx(statistics.median(before))
    assert warning.evidence["minimum"] == pytest.approx(so_far)
    assert warning.evidence["depth"] == pytest.approx(statistics.median(before) - so_far)
    assert warning.evidence["depth"] > 0.2


def test_min_acc_and_wc_acc_recorded_in_the_gap_run_match_a_hand_computation_from_its_evals(gap_run):
    _, run_dir = gap_run
    with RunReader(run_dir) as store:
        a_steps, a_values = store.signal(keys.EVAL_PER_NAME + "A")
        b_steps, b_values = store.signal(keys.EVAL_PER_NAME + "B")
        min_steps, min_acc = store.signal(keys.CONTINUAL_MIN_ACC)
        wc_steps, wc_acc = store.signal(keys.CONTINUAL_WC_ACC)
    # De Lange et al.: task A is finished from the switch on; min-ACC is its worst eval since, WC-ACC the mean of
    # the current task's latest eval and that minimum ((1/k)·A(current) + (1 − 1/k)·min-ACC with k = 2)
    for i, step in enumerate(min_steps.tolist()):
        assert step >= SWITCH  # nothing before a task has finished
        hand = min(v for s, v in zip(a_steps, a_values, strict=True) if SWITCH <= s <= step)
        assert min_acc[i] == pytest.approx(hand)
        [b_now] = [v for s, v in zip(b_steps, b_values, strict=True) if s == step]
        [j] = [k for k, s in enumerate(wc_steps.tolist()) if s == step]
        assert wc_acc[j] == pytest.approx(0.5 * b_now + 0.5 * hand)
    assert min_steps.tolist()[-1] == CHEAP["steps"] - 1


def test_noisy_eval_finetune_evals_fluctuate_and_raise_nothing():
    scenario = create_scenario("noisy_eval_finetune")
    threads = torch.get_num_threads()
    result = scenario.run(steps=80)
    assert torch.get_num_threads() == threads  # the run's one thread is given back
    late = [v for s, v in result.evals["A"] if s >= 40]
    assert len({round(v, 4) for v in late}) > 3 and max(late) - min(late) >= 0.04  # 64 fresh examples: noisy
    assert result.alarms() == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"switch_step": 0}, r"switch_step=0; allowed: None or an int in 1\.\.399"),
        ({"switch_step": 400}, r"switch_step=400; allowed"),
        ({"replay": 32}, r"replay=32; allowed: fewer than batch_size=32"),
        ({"momentum": 1.0}, r"momentum=1\.0; allowed: 0 <= momentum < 1"),
        ({"noise": 0.0}, r"noise=0\.0; allowed: a finite number > 0"),
        ({"eval_every": 0}, r"eval_every=0; allowed: an int >= 1"),
        ({"steps": 2.5}, r"steps=2\.5"),
    ],
)
def test_a_bad_continual_config_is_one_error_naming_the_field_and_what_is_allowed(fields, message):
    with pytest.raises(ValueError, match=message):
        ContinualConfig(**fields)


def test_classes_are_equally_far_apart_at_every_seed():
    for seed in range(3):
        means = GaussianClasses(seed, noise=1.0).means
        distances = [float((means[i] - means[j]).norm()) for i in range(4) for j in range(i + 1, 4)]
        assert max(distances) - min(distances) < 1e-4
