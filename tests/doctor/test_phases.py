"""`keel doctor` on a store with declared phases (`Guard.phase`) uses them as the live Guard did: the loss and
grad-norm baselines restart at a task switch, and the stability gap judges each eval by its declared goal and task.

The slow test starts from a class-incremental stream in the shape of Split-MNIST (De Lange et al. 2023's ER
baseline: two tasks of two classes, one shared head, replay; `keel.harness.scenarios._continual`) run under the
real Guard; the others write stores with the meta the Guard writes (checked against the Guard's in the slow test).
"""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import RawLog, examine, examine_log
from keel.doctor.phases import START_PHASE, Declared, read_declared
from keel.store import RunReader, RunWriter

PHASES = [{"index": 0, "name": "A", "step": 0}, {"index": 1, "name": "B", "step": 80, "rebaselined": ["spike(loss)"]}]


def _loss(steps, switch=80, seed=0):
    """Cross-entropy-like: 2.0 on task A, then 5.0 from the switch on (new classes), 1 % noise."""
    rng = np.random.default_rng(seed)
    steps = np.asarray(steps)
    return np.where(steps < switch, 2.0, 5.0) * (1 + 0.01 * rng.standard_normal(len(steps)))


def _store(run_dir, *, meta=None, evals=None, steps=160):
    with RunWriter(run_dir) as writer:
        writer.set_meta({"status": "finished", **(meta or {})})
        writer.add_series("loss", np.arange(steps), _loss(np.arange(steps)))
        for key, (eval_steps, values) in (evals or {}).items():
            writer.add_series(key, eval_steps, values)
        if meta and "phases" in meta:
            writer.add_series("phase/index", [0, 80], [0.0, 1.0])  # as the Guard records it: at step 0 and a switch
    return run_dir


def _found(result, kind=None):
    return [(f.step, f.kind, f.severity, f.signal) for f in result.findings if kind is None or f.kind == kind]


def test_a_loss_jump_at_a_declared_task_switch_is_not_a_spike(tmp_path):
    plain = examine_log(_store(tmp_path / "plain"))
    assert any(f.kind == "loss_spike" and f.severity != "info" for f in plain.findings)  # the jump, undeclared
    declared = examine_log(_store(tmp_path / "declared", meta={"phases": PHASES}))
    assert _found(declared) == []
    assert declared.summary["phases"] == [
        {"index": 0, "name": "A", "step": 0, "stability_gaps": []},
        {"index": 1, "name": "B", "step": 80, "stability_gaps": []},
    ]


def test_the_stability_gap_reads_each_eval_by_its_declared_goal_and_task(tmp_path):
    at = np.arange(3, 160, 4)  # an eval round every 4 steps
    rng = np.random.default_rng(1)
    after = np.clip(at - 80, 0, None)
    err_a = np.where(at < 80, 0.10, 0.10 + 0.35 * np.exp(-after / 12.0)) + 0.002 * rng.standard_normal(len(at))
    acc_b = np.where(at < 80, 0.60, 0.30 + 0.6 * (1 - np.exp(-after / 20.0))) + 0.002 * rng.standard_normal(len(at))
    evals = {"eval/err_A": (at, err_a), "eval/acc_B": (at, acc_b)}
    meta = {
        "phases": PHASES,
        "evals": {"err_A": {"every": 4, "task": "A", "goal": "min"}, "acc_B": {"every": 4, "task": "B", "goal": "max"}},
    }
    guessed = examine_log(_store(tmp_path / "guessed", meta={"phases": PHASES}, evals=evals))
    # undeclared: an error rate read as higher-is-better (its rise is no gap), task B's eval judged at its own switch
    assert {f.signal for f in guessed.findings if f.kind == "stability_gap"} == {"eval/acc_B"}
    result = examine_log(_store(tmp_path / "declared", meta=meta, evals=evals))
    gaps = [f for f in result.findings if f.kind == "stability_gap"]
    assert [(f.signal, f.severity, f.evidence["goal"]) for f in gaps] == [
        ("eval/err_A", "warning", "min"),
        ("eval/err_A", "info", "min"),
    ]
    assert gaps[0].evidence["value_before"] == pytest.approx(0.10, abs=0.01) and gaps[0].evidence["minimum"] > 0.3
    assert result.summary["phases"][1]["stability_gaps"] == ["eval/err_A"]


def _raw(steps, *, rollbacks=None):
    steps = list(steps)
    return RawLog(
        source="gen",
        format="keel_store",
        keyed=True,
        records=[(s, {"loss": v}) for s, v in zip(steps, _loss(steps).tolist(), strict=True)],
        rollbacks=rollbacks or {},
        declared=Declared(phases=[(0, "A"), (80, "B")]),
    )


@pytest.mark.parametrize(
    "log",
    [
        _raw([*range(0, 120), *range(100, 160)]),  # restarted past the switch: the replay crosses it again
        _raw([*range(0, 120), *range(60, 160)]),  # restarted before it: the new stretch crosses it
        _raw([*range(0, 121), *range(121, 160)], rollbacks={120: 90}),  # rolled back to a step past it
    ],
    ids=["restart-after-switch", "restart-before-switch", "rollback"],
)
def test_a_rewind_restarts_the_baselines_wherever_its_replay_or_its_new_stretch_crosses_the_switch(log):
    assert _found(examine(log)) == []
    undeclared = examine(RawLog(source="gen", format="keel_store", keyed=True, records=list(log.records)))
    assert any(f.kind == "loss_spike" for f in undeclared.findings)


@pytest.mark.parametrize(
    "phases",
    ["A", [{"index": 0, "name": "A"}], [{"index": 0, "name": "A", "step": 5}, {"index": 1, "name": "B", "step": 5}]],
)
def test_malformed_phases_are_noted_and_the_store_is_read_without_them(tmp_path, phases):
    result = examine_log(_store(tmp_path / "run", meta={"phases": phases}))
    assert any("'phases'" in note for note in result.summary["notes"])
    assert "phases" not in result.summary
    assert any(f.kind == "loss_spike" for f in result.findings)


def test_the_unnamed_first_phase_is_the_guards(tmp_path):
    from keel.guard.evaluation import START_PHASE as GUARD_START

    assert START_PHASE == GUARD_START
    late = [{"index": 0, "name": "start", "step": 0}, {"index": 1, "name": "B", "step": 80}]
    result = examine_log(_store(tmp_path / "run", meta={"phases": late}))
    assert [p["name"] for p in result.summary["phases"]] == ["start", "B"]
    assert _found(result) == []


@pytest.mark.slow
def test_keel_doctor_on_a_class_incremental_guard_store_finds_what_the_guard_found_live(tmp_path, capsys):
    from keel.harness.scenarios._continual import ContinualConfig, train_continual

    config = ContinualConfig(steps=200, switch_step=150, eval_every=4, eval_examples=200)
    train_continual(config, name="split", run_dir=str(tmp_path / "run"))
    with RunReader(tmp_path / "run") as run:
        live = [(f.step, f.kind, f.severity, f.signal) for f in run.findings()]
        meta = run.meta()
    assert [(p["name"], p["step"]) for p in meta["phases"]] == [("A", 0), ("B", 150)]  # the shape the tests write
    assert meta["evals"]["A"] == {"every": 4, "task": "A", "goal": "max"}
    result = examine_log(tmp_path / "run")
    assert _found(result) == live  # before: loss_spike warning at 156 and critical at 161, the switch's jump
    assert [f[1] for f in live] == ["stability_gap", "stability_gap"]
    assert result.summary["phases"][1] == {"index": 1, "name": "B", "step": 150, "stability_gaps": ["eval/A"]}
    assert main(["doctor", str(tmp_path / "run")]) == 0
    assert "1 'B' from step 150 (stability gap: eval/A)" in capsys.readouterr().out


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
PHASE_ENTRY = st.fixed_dictionaries(
    {
        "index": st.integers(-2, 3) | JSON,
        "name": st.sampled_from(["A", "B", "start"]) | JSON,
        "step": st.integers(-(2**70), 2**70) | JSON,
    }
)


@settings(max_examples=30, deadline=None)
@example(phases=[{"index": 0, "name": "A", "step": 0}, {"index": 1, "name": "B", "step": 2**70}], evals={})
@given(phases=st.lists(PHASE_ENTRY, max_size=4) | JSON, evals=st.dictionaries(st.text(max_size=4), JSON) | JSON)
def test_any_phases_and_evals_meta_is_read_or_noted_never_raised(phases, evals):
    notes = []
    declared = read_declared({"phases": phases, "evals": evals}, ["loss", "eval/A"], notes)
    if declared is not None:
        steps = [0, 5, 2**61 - 1]
        examine(
            RawLog(
                source="x",
                format="keel_store",
                keyed=True,
                records=[(s, {"loss": 1.0}) for s in steps],
                declared=declared,
            )
        )
