"""Guard.evaluate / record_eval / phase: scheduled evals recorded as eval/ signals, training left exactly as it was."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from keel import Guard
from keel._core import keys
from keel._core.errors import GuardClosed
from keel.doctor import examine_log
from keel.guard.evaluation import EvalResult
from keel.store.reader import RunReader


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 1))


def _train(guard: Guard, model: nn.Module, opt: torch.optim.Optimizer, steps: int, on_step=None) -> list[float]:
    """A loop whose data and dropout draw from the global generators, so a leaked draw changes the run."""
    losses = []
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        x = torch.randn(16, 4) + random.random() + float(np.random.rand())
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _run(tmp_path, steps=8, setup=None, on_step=None, **guard_args):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Guard(model, opt, run_dir=str(tmp_path), **guard_args) as guard:
        if setup is not None:
            setup(guard)
        losses = _train(guard, model, opt, steps, on_step)
    return model, losses, guard


def _random_eval(model: nn.Module) -> dict[str, float]:
    """An eval that draws from every global generator the loop uses, in train-mode-sensitive layers too."""
    x = torch.randn(8, 4)
    noise = random.random() + float(np.random.rand()) + float(torch.rand(()))
    return {"mse": float(model(x).pow(2).mean()), "noise": noise}


def test_an_eval_that_draws_random_numbers_leaves_the_run_bit_identical_to_the_run_without_it(tmp_path):
    bare, bare_losses, _ = _run(tmp_path / "bare")
    evaluated, losses, _ = _run(tmp_path / "eval", setup=lambda g: g.evaluate("val", _random_eval, every=3))
    assert losses == bare_losses
    for p, q in zip(bare.parameters(), evaluated.parameters(), strict=True):
        assert torch.equal(p, q)


def test_evals_run_after_every_kth_step_and_are_stored_at_that_step(tmp_path):
    _run(tmp_path, steps=10, setup=lambda g: g.evaluate("val", lambda m: 0.25, every=4))
    with RunReader(tmp_path) as reader:
        steps, values = reader.signal(keys.EVAL_PER_NAME + "val")
    assert steps.tolist() == [3, 7] and values.tolist() == [0.25, 0.25]


def test_eval_runs_in_eval_mode_without_grad_and_every_submodule_mode_is_restored(tmp_path):
    seen = []

    def fn(model: nn.Module) -> float:
        seen.append((torch.is_grad_enabled(), [m.training for m in model.modules()]))
        return 0.0

    model = _model()
    model[1].eval()  # the loop froze this one: it must stay in eval mode after the eval, the rest in train
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with Guard(model, opt) as guard:
        guard.evaluate("val", fn, every=1)
        _train(guard, model, opt, 2)
        modes = [m.training for m in model.modules()]
    assert seen == [(False, [False] * 5)] * 2
    assert modes == [True, True, False, True, True]


RESULTS = {  # each allowed result shape (one eval each, in one run) → the signals it records
    "number": (0.5, {"eval/number": 0.5}),
    "tensor": (torch.tensor(2.0), {"eval/tensor": 2.0}),
    "dict": ({"acc": 0.75, "loss": torch.tensor(1.5)}, {"eval/dict/acc": 0.75, "eval/dict/loss": 1.5}),
    "scores": (torch.tensor([1.0, 2.0, 6.0]), {"eval/scores": 3.0}),  # per-example scores: their mean
    "nan": (float("nan"), {"eval/nan": math.nan}),  # a NaN eval is a value, recorded as such
}
MALFORMED = {  # each failing or malformed eval (one run): recorded once, switched off
    "raises": lambda m: 1 / 0,
    "str": lambda m: "high",
    "matrix": lambda m: torch.ones(2, 2),
    "empty_dict": lambda m: {},
    "list_metric": lambda m: {"acc": [1, 2]},
    "bool": lambda m: True,
}


def test_each_allowed_result_shape_is_recorded_under_its_keys(tmp_path):
    def setup(guard):
        for name, (result, _) in RESULTS.items():
            guard.evaluate(name, lambda m, result=result: result, every=2)

    _run(tmp_path, steps=2, setup=setup)
    with RunReader(tmp_path) as reader:
        got = {k: reader.signal(k) for k in reader.signal_keys() if k.startswith("eval/")}
    expected = {k: v for _, keyed in RESULTS.values() for k, v in keyed.items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key][0].tolist() == [1] and got[key][1].tolist() == [pytest.approx(value, nan_ok=True)]


def test_a_failing_or_malformed_eval_is_a_keel_error_is_switched_off_and_training_goes_on(tmp_path):
    calls = []

    def setup(guard):
        for name, fn in MALFORMED.items():
            guard.evaluate(name, lambda m, fn=fn: calls.append(1) or fn(m), every=1)
        guard.evaluate("ok", lambda m: 1.0, every=1)

    model, losses, guard = _run(tmp_path, steps=4, setup=setup)
    assert len(losses) == 4 and len(calls) == len(MALFORMED)  # each called once, then off
    errors = [(f.signal, f.step) for f in guard.findings if f.kind == "keel_error"]
    assert errors == [(f"eval:{name}", 0) for name in MALFORMED]
    with RunReader(tmp_path) as reader:
        assert reader.signal("eval/ok")[0].tolist() == list(range(4))
        assert not any(f"eval/{name}" in reader.signal_keys() for name in MALFORMED)
        assert reader.meta()["disabled"] == [f"eval:{name}" for name in MALFORMED]
    assert all(m.training for m in model.modules())  # modes restored even though fn raised


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="", fn=lambda m: 0.0, every=1), "name=''"),
        (dict(name="a/b", fn=lambda m: 0.0, every=1), "without '/'"),
        (dict(name="val", fn="not callable", every=1), "callable"),
        (dict(name="val", fn=lambda m: 0.0, every=0), "every=0"),
        (dict(name="val", fn=lambda m: 0.0, every=2.5), "every=2.5"),
        (dict(name="val", fn=lambda m: 0.0, every=True), "every=True"),
        (dict(name="val", fn=lambda m: 0.0, every=1, goal="up"), "goal='up'"),
        (dict(name="val", fn=lambda m: 0.0, every=1, task=""), "task=''"),
    ],
)
def test_bad_evaluate_arguments_raise_one_error_naming_the_value(kwargs, match):
    model = nn.Linear(2, 1)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        guard.evaluate(**kwargs)
    guard.close()


def test_a_name_used_twice_is_refused(tmp_path):
    model = nn.Linear(2, 1)
    with Guard(model, torch.optim.SGD(model.parameters(), lr=0.1)) as guard:
        guard.evaluate("val", lambda m: 0.0, every=1)
        with pytest.raises(ValueError, match="exists"):
            guard.evaluate("val", lambda m: 1.0, every=2)
        with pytest.raises(ValueError, match="scheduled by evaluate"):
            guard.record_eval({"acc": 1.0}, name="val")


def test_record_eval_stores_the_metrics_at_the_last_finished_step(tmp_path):
    def on_step(step):
        if step == 5:
            guard_ref[0].record_eval({"eval_loss": 0.5, "eval_acc": torch.tensor(0.9)}, name="hf")

    guard_ref = []
    _run(tmp_path, steps=8, setup=guard_ref.append, on_step=on_step)
    with RunReader(tmp_path) as reader:
        assert reader.signal("eval/hf/eval_loss")[0].tolist() == [4]  # 5 steps (0…4) were done
        assert reader.signal("eval/hf/eval_acc")[1].tolist() == [pytest.approx(0.9)]
        assert reader.meta()["evals"] == {"hf": {"every": None, "task": None, "goal": "max"}}


@pytest.mark.parametrize(
    ("metrics", "match"),
    [({}, "non-empty"), ({"acc": "high"}, "'high'"), ([("acc", 1.0)], "allowed: a non-empty dict"), ({"": 1.0}, "''")],
)
def test_record_eval_refuses_bad_metrics_with_one_error(metrics, match):
    model = nn.Linear(2, 1)
    with Guard(model, torch.optim.SGD(model.parameters(), lr=0.1)) as guard:
        with pytest.raises(ValueError, match=match):
            guard.record_eval(metrics)


def test_record_eval_with_another_task_than_its_first_call_is_refused():
    model = nn.Linear(2, 1)
    with Guard(model, torch.optim.SGD(model.parameters(), lr=0.1)) as guard:
        guard.record_eval({"acc": 1.0}, task="a")
        with pytest.raises(ValueError, match="same task and goal"):
            guard.record_eval({"acc": 1.0}, task="b")


REBASELINED = ["spike(loss)", "spike(grad/norm)", "divergence(loss)"]  # the default one-signal baselines


def test_phase_index_is_recorded_at_step_0_and_where_it_changes_and_the_switches_in_meta(tmp_path):
    def on_step(step):
        if step in (4, 8):
            guard_ref[0].phase({4: "b", 8: "a"}[step])

    guard_ref = []
    _run(tmp_path, steps=10, setup=lambda g: (guard_ref.append(g), g.phase("a")), on_step=on_step)
    with RunReader(tmp_path) as reader:
        steps, index = reader.signal(keys.PHASE_INDEX)
        phases = reader.meta()["phases"]
    assert (steps.tolist(), index.tolist()) == ([0, 4, 8], [0, 1, 0])  # back to "a": its index again
    assert phases == [
        {"index": 0, "name": "a", "step": 0},
        {"index": 1, "name": "b", "step": 4, "rebaselined": REBASELINED},
        {"index": 0, "name": "a", "step": 8, "rebaselined": REBASELINED},
    ]


def test_a_first_phase_after_step_0_names_the_steps_before_it_start(tmp_path):
    def on_step(step):
        if step == 3:
            guard_ref[0].phase("finetune")

    guard_ref = []
    _run(tmp_path, steps=5, setup=guard_ref.append, on_step=on_step)
    with RunReader(tmp_path) as reader:
        steps, index = reader.signal(keys.PHASE_INDEX)
        assert (steps.tolist(), index.tolist()) == ([0, 3], [0, 1])
        assert [p["name"] for p in reader.meta()["phases"]] == ["start", "finetune"]


def test_listeners_get_per_example_scores_and_their_signals_are_recorded(tmp_path):
    got: list[EvalResult] = []

    class Listener:
        def on_eval(self, result: EvalResult) -> dict[str, float]:
            got.append(result)
            return {"eval_stability/n/eval/val": float(result.scores.numel())}

    def setup(guard):
        guard.evaluation.listeners.append(Listener())
        guard.evaluate("val", lambda m: torch.tensor([1.0, 3.0]), every=2)

    _run(tmp_path, steps=4, setup=setup)
    assert [(r.step, r.headline, r.scores.tolist()) for r in got] == [
        (1, "eval/val", [1.0, 3.0]),
        (3, "eval/val", [1.0, 3.0]),
    ]
    with RunReader(tmp_path) as reader:
        assert reader.signal("eval_stability/n/eval/val")[1].tolist() == [2.0, 2.0]


def test_evaluate_record_eval_and_phase_after_close_raise_guard_closed():
    model = nn.Linear(2, 1)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    guard.close()
    for call in (
        lambda: guard.evaluate("v", lambda m: 0.0, every=1),
        lambda: guard.record_eval({"a": 1.0}),
        lambda: guard.phase("b"),
    ):
        with pytest.raises(GuardClosed):
            call()


def test_evals_run_under_deferred_sync_too(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with Guard(model, opt, run_dir=str(tmp_path), sync="deferred", policy="skip") as guard:
        guard.evaluate("val", lambda m: 1.0, every=2)
        for _ in range(4):
            loss = model(torch.ones(2, 4)).pow(2).mean()
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    with RunReader(tmp_path) as reader:
        assert reader.signal("eval/val")[0].tolist() == [1, 3]


def test_evals_tied_to_tasks_give_the_continual_metrics_at_each_round(tmp_path):
    accuracy = {"a": iter([0.6, 0.9, 0.5, 0.8]), "b": iter([0.1, 0.7, 0.85])}

    def setup(guard):
        guard.phase("a")
        guard.evaluate("a", lambda m: next(accuracy["a"]), every=5, task="a")
        guard_ref.append(guard)

    def on_step(step):
        if step == 10:
            guard_ref[0].phase("b")
            guard_ref[0].evaluate("b", lambda m: next(accuracy["b"]), every=5, task="b")

    guard_ref = []
    _run(tmp_path, steps=20, setup=setup, on_step=on_step)
    with RunReader(tmp_path) as reader:
        steps, min_acc = reader.signal(keys.CONTINUAL_MIN_ACC)
        wc_steps, wc_acc = reader.signal(keys.CONTINUAL_WC_ACC)
    # a trains steps 0-9 (evals .6, .9: WC-ACC is a's own value), b from 10 (evals .1, .7): a reads .5 then .8
    # → min-ACC .5 from step 14 on; WC-ACC = mean(b's latest, .5)
    assert steps.tolist() == [14, 19] and min_acc.tolist() == [0.5, 0.5]
    assert wc_steps.tolist() == [4, 9, 14, 19]
    assert wc_acc.tolist() == pytest.approx([0.6, 0.9, (0.1 + 0.5) / 2, (0.7 + 0.5) / 2])


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_a_stability_gap_after_a_phase_switch_is_found_by_the_default_detectors_and_stored(tmp_path, sync):
    # task a's eval: steady near .8 for 6 evals, then the switch to b at step 30: .3, then back to .8
    scripted = iter([0.80, 0.82, 0.81, 0.80, 0.82, 0.81, 0.30, 0.50, 0.80, 0.81])
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=sync == "deferred")
    with Guard(model, opt, run_dir=str(tmp_path), sync=sync, policy="skip") as guard:
        guard.evaluate("a", lambda m: next(scripted), every=5, task="a")
        for step in range(50):
            if step == 30:
                guard.phase("b")
            loss = model(torch.ones(2, 4)).pow(2).mean()
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    gaps = [f for f in guard.findings if f.kind == "stability_gap"]
    assert [(f.severity, f.step) for f in gaps] == [("warning", 39), ("info", 44)]  # .30 and .50: two low evals
    assert gaps[0].evidence["switch_step"] == 30 and gaps[0].evidence["depth"] == pytest.approx(0.51)
    assert gaps[1].evidence["recovery_steps"] == 14
    with RunReader(tmp_path) as reader:
        assert [(f.step, f.severity) for f in reader.findings() if f.kind == "stability_gap"] == [
            (39, "warning"),
            (44, "info"),
        ]
    if sync == "step":  # keel doctor re-reads the store (eval/ rows, phase/index at its switches): the same gap
        offline = [f for f in examine_log(tmp_path).findings if f.kind == "stability_gap"]
        assert [(f.step, f.severity) for f in offline] == [(39, "warning"), (44, "info")]


def _switch_loop(tmp_path, *, declared: bool) -> Guard:
    """A regression whose target jumps from 0 to 30 at step 40 (a new task): under "recover", undeclared, the loss
    jump reads as a divergence."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(16, 4)
    with Guard(model, opt, run_dir=str(tmp_path), policy="recover", overwrite=True) as guard:
        for step in range(80):
            if step == 40 and declared:
                guard.phase("b")
            loss = (model(x) - (30.0 if step >= 40 else 0.0)).pow(2).mean()
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    return guard


def test_a_declared_phase_switch_starts_new_loss_baselines_so_recover_does_not_roll_back(tmp_path):
    undeclared = _switch_loop(tmp_path / "undeclared", declared=False)
    assert any(d.action == "rollback" for d in undeclared.decisions)  # what the switch looks like unannounced
    declared = _switch_loop(tmp_path / "declared", declared=True)
    assert declared.decisions == []
    with RunReader(tmp_path / "declared") as reader:
        (start, switch) = reader.meta()["phases"]
    assert switch["step"] == 40 and switch["rebaselined"] == REBASELINED


def test_an_eval_metric_that_turns_non_finite_is_a_warning_said_once_per_turn():
    """An fp16 eval that overflows or an empty eval set gave NaN/Inf and no finding: the eval detectors skip such a
    value, and the run read as healthy (reviewer h26 V9)."""
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    accuracies = [0.5, math.nan, math.nan, 0.6, math.inf, 0.7]
    with Guard(model, opt) as guard:
        for accuracy in accuracies:
            loss = model(torch.ones(4, 2)).square().mean()
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
            guard.record_eval({"acc": accuracy, "loss": 1.0}, name="val")
    said = [(f.step, f.kind, f.severity, f.signal) for f in guard.findings if f.evidence.get("eval") == "val"]
    assert said == [(1, "non_finite", "warning", "eval/val/acc"), (4, "non_finite", "warning", "eval/val/acc")]
    assert not guard.decisions  # evals never decide a step


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_a_rollback_to_before_a_task_switch_restarts_the_loss_baselines_as_the_switch_did(tmp_path, sync):
    """A rollback to a snapshot from before phase('B') restored task A's loss baselines while training went on with
    task B's data: B's higher loss read as spikes, a critical and a second rollback (helper C's C4)."""
    from keel import RecoveryConfig
    from keel.harness.scenarios._continual import (
        MEMORY,
        TASKS,
        ContinualConfig,
        GaussianClasses,
        _batch,
        build_classifier,
    )

    torch.manual_seed(0)
    cfg = ContinualConfig(steps=230, switch_step=150, eval_every=4, eval_examples=200)
    data, model = GaussianClasses(0, 1.0), build_classifier(0)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, fused=sync == "deferred")
    memory = data.sample(TASKS["A"], MEMORY)
    guard = Guard(
        model, opt, policy="recover", seed=0, sync=sync, max_consecutive_skips=2,
        recovery=RecoveryConfig(snapshot_every=20),
    )  # fmt: skip
    guard.phase("A")
    for step in range(cfg.steps):
        if step == cfg.switch_step:
            guard.phase("B")
        x, y = _batch(cfg, data, memory, step)
        loss = torch.nn.functional.cross_entropy(model(x), y) * (math.nan if 156 <= step < 161 else 1.0)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.close()
    rollbacks = [(d.step, d.restored_step) for d in guard.decisions if d.action == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0][1] < cfg.switch_step  # the NaN burst's, past the switch
    late = [(f.step, f.kind, f.severity) for f in guard.findings if f.step > 161 and f.kind == "loss_spike"]
    assert [f for f in late if f[2] != "info"] == []
