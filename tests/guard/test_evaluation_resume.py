"""A resumed run keeps its evaluation state: phases, the continual metrics' inputs, the stability-gap detector's
baselines, the eval schedule and eval stability, as if it had never stopped; a snapshot without that state, or
with a damaged one, still resumes (starting it empty, saying why)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel import Guard, RecoveryConfig
from keel._core import keys
from keel._core.errors import KeelWarning
from keel.guard.evaluation import Evaluation
from keel.recover.disk_format import meta_checksum
from keel.recover.state import capture_plain, restore, tensor_sources
from keel.store import RunReader

# Task a's accuracy: steady for 5 evals, then a gap after the switch to b at step 5, recovered at step 7.
ACC_A = [0.80, 0.82, 0.81, 0.83, 0.82, 0.40, 0.55, 0.70, 0.81]
ACC_B = [math.nan] * 5 + [0.10, 0.20, 0.30, 0.40]
STEPS, SWITCH = len(ACC_A), 5


def _guard(run_dir, *, resume=False, sync="step"):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    guard = Guard(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        run_dir=str(run_dir),
        resume=resume,
        recovery=RecoveryConfig(snapshot_every=1, disk_every=1),
        sync=sync,
    )
    guard.evaluate("a", lambda m: ACC_A[guard.global_step - 1], every=1, task="a")
    guard.evaluate("b", lambda m: {"acc": ACC_B[guard.global_step - 1]}, every=1, task="b")
    return guard, model


def _train(guard, model, until):
    x = torch.ones(4, 2)
    for step in range(guard.global_step, until):
        if step == 0:
            guard.phase("a")
        if step == SWITCH:
            guard.phase("b")
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.step(loss)
        model.zero_grad(set_to_none=True)
        if guard.recovery is not None and guard.recovery.disk is not None:
            guard.recovery.disk.wait()  # a write still running when the next is due is dropped: resume points vary


def _outcome(guard, run_dir):
    with RunReader(run_dir) as store:
        continual = {
            k: [round(float(v), 9) for v in store.signal(k)[1]] for k in store.signal_keys() if k.startswith("contin")
        }
        gaps = [(f.step, f.severity, f.evidence["depth"]) for f in store.findings() if f.kind == "stability_gap"]
        phase_meta = store.meta().get("phases")
    return {
        "phases": [p.to_dict() for p in guard.evaluation.phases],
        "phase_meta": phase_meta,
        "tracks": json.dumps(guard.evaluation.state_dict()["tracks"], sort_keys=True),  # NaN != NaN: as text
        "continual": continual,
        "gaps": gaps,
        "stability": json.dumps(guard.evaluation.listeners[0].state_dict(), sort_keys=True),
    }


@pytest.mark.parametrize("sync", ["step", pytest.param("deferred", marks=pytest.mark.slow)])
def test_a_resumed_continual_run_gives_the_phases_metrics_and_stability_gaps_of_the_uninterrupted_run(tmp_path, sync):
    guard, model = _guard(tmp_path / "whole", sync=sync)
    _train(guard, model, STEPS)
    guard.close()
    whole = _outcome(guard, tmp_path / "whole")
    assert [(s, sev) for s, sev, _ in whole["gaps"]] == [(6, "warning"), (7, "info")]  # the scenario shows a gap
    assert whole["continual"][keys.CONTINUAL_FORGETTING]

    guard, model = _guard(tmp_path / "cut", sync=sync)
    _train(guard, model, 7)  # stopped inside the gap: warned, not yet recovered
    guard.close()
    guard, model = _guard(tmp_path / "cut", resume=True, sync=sync)
    assert guard.global_step == 7
    _train(guard, model, STEPS)
    guard.close()
    assert _outcome(guard, tmp_path / "cut") == whole


def test_the_eval_schedule_goes_on_at_the_same_steps_after_a_resume(tmp_path):
    guard, model = _guard(tmp_path)
    _train(guard, model, 3)
    guard.close()
    guard, model = _guard(tmp_path, resume=True)
    _train(guard, model, 5)
    guard.close()
    with RunReader(tmp_path) as store:
        assert list(store.signal("eval/a")[0]) == [0, 1, 2, 3, 4]


def test_a_rollback_keeps_the_phases_and_evals_measured_since_the_snapshot_and_a_resume_restores_them():
    model = torch.nn.Linear(2, 1)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.01))
    guard.evaluate("a", lambda m: ACC_A[guard.global_step - 1], every=1, task="a")
    _train(guard, model, 4)
    params, buffers, skeleton = tensor_sources(guard.state)
    tensors = {k: v.clone() for k, v in {**params, **buffers}.items()}
    plain, at_snapshot = capture_plain(guard.state), guard.evaluation.state_dict()
    _train(guard, model, 7)  # the switch to b and three more evals
    later = guard.evaluation.state_dict()
    assert later != at_snapshot
    restore(guard.state, tensors, skeleton, plain, resume=False)  # a rollback: the run's own history stays
    assert guard.evaluation.state_dict() == later
    restore(guard.state, tensors, skeleton, plain, resume=True)  # a resume: back to the snapshot's
    assert guard.evaluation.state_dict() == at_snapshot
    guard.close()


def _snapshot_meta(run_dir):
    newest = max((run_dir / "snapshots").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    return newest / "meta.json"


def _rewrite_history(run_dir, change):
    """Edit the evaluation entry of the newest snapshot's history and re-sign meta.json (a hostile writer)."""
    path = _snapshot_meta(run_dir)
    meta = json.loads(path.read_text())
    history = meta["plain"]["__dict__"]
    entry = next(e for e in history if e[0] == "history")[1]["__dict__"]
    pairs = [pair for pair in entry if pair[0] != "evaluation"]
    value = change(next((pair[1] for pair in entry if pair[0] == "evaluation"), None))
    if value is not _DROP:
        pairs.append(["evaluation", value])
    entry[:] = pairs
    meta["meta_sha256"] = meta_checksum(meta)
    path.write_text(json.dumps(meta))


_DROP = object()


def test_a_snapshot_without_evaluation_state_resumes_with_it_empty_and_says_so(tmp_path):
    guard, model = _guard(tmp_path)
    _train(guard, model, 7)
    guard.close()
    _rewrite_history(tmp_path, lambda value: _DROP)  # as written before the evaluation state was kept
    with pytest.warns(KeelWarning, match="holds no evaluation state"):
        guard, model = _guard(tmp_path, resume=True)
    assert guard.global_step == 7 and guard.evaluation.phases == [] and guard.evaluation.tracks == {}
    _train(guard, model, STEPS)  # trains on
    guard.close()
    with RunReader(tmp_path) as store:
        assert "holds no evaluation state" in store.meta()["evaluation_restore"]


HOSTILE = [
    "not a dict",
    {"phases": "x", "tracks": {}, "listeners": {}},
    {"phases": [{"index": -1, "name": "a", "step": 0}], "tracks": {}, "listeners": {}},
    {"phases": [{"index": 0, "name": "", "step": 0}], "tracks": {}, "listeners": {}},
    {"phases": [{"index": 0, "name": "a", "step": 5}, {"index": 1, "name": "b", "step": 2}], "tracks": {}},
    {"phases": [], "tracks": {"eval/a": {"task": "a", "goal": "up", "steps": [1], "values": [0.1]}}},
    {"phases": [], "tracks": {"eval/a": {"task": "a", "goal": "max", "steps": [3, 1], "values": [0.1, 0.2]}}},
    {"phases": [], "tracks": {"eval/a": {"task": "a", "goal": "max", "steps": [1], "values": []}}},
    {"phases": [], "tracks": {"eval/a": {"task": "a", "goal": "max", "steps": [True], "values": [0.1]}}},
    {"phases": [], "tracks": {}, "listeners": {"0:EvalStability": {"values": 3}}},
    {"phases": [], "tracks": {}, "listeners": {}, "announce": "x"},
]


@pytest.mark.parametrize("state", HOSTILE, ids=range(len(HOSTILE)))
def test_damaged_evaluation_state_is_ignored_with_a_recorded_reason_and_never_half_loaded(state):
    model = torch.nn.Linear(2, 1)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.01))
    guard.phase("z")
    before = guard.evaluation.state_dict()
    guard.evaluation.load_state_dict(state)
    assert guard.evaluation.restore_problem and "evaluation state" in guard.evaluation.restore_problem
    assert guard.evaluation.state_dict() == before  # all or nothing
    guard.close()


def test_a_hostile_snapshot_evaluation_state_resumes_training_and_records_a_keel_error(tmp_path):
    guard, model = _guard(tmp_path)
    _train(guard, model, 7)
    guard.close()
    _rewrite_history(tmp_path, lambda value: {"__dict__": [["phases", "hostile"]]})
    with pytest.warns(KeelWarning, match="evaluation state"):
        guard, model = _guard(tmp_path, resume=True)
    assert guard.global_step == 7 and guard.evaluation.phases == []
    _train(guard, model, STEPS)
    guard.close()
    with RunReader(tmp_path) as store:
        errors = [f for f in store.findings() if f.kind == "keel_error"]
    assert [f.signal for f in errors] == ["evaluation state"] and errors[0].step == 7


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    phases=_JSONISH,
    tracks=_JSONISH
    | st.dictionaries(
        st.just("eval/a"), st.dictionaries(st.sampled_from(["task", "goal", "steps", "values"]), _JSONISH)
    ),
    listeners=_JSONISH,
)
def test_any_evaluation_state_loads_whole_or_not_at_all_and_never_raises(phases, tracks, listeners):
    evaluation = _bare_evaluation()
    before = evaluation.state_dict()
    evaluation.load_state_dict({"phases": phases, "tracks": tracks, "listeners": listeners})
    if evaluation.restore_problem:
        assert evaluation.state_dict() == before
    else:
        again = _bare_evaluation()
        again.load_state_dict(evaluation.state_dict())
        assert again.state_dict() == evaluation.state_dict() and again.restore_problem is None


def _bare_evaluation() -> Evaluation:
    from keel.guard.components import Components
    from keel.guard.recorder import Recorder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Evaluation(torch.nn.Linear(1, 1), Components([], [], lambda *a: None), Recorder(None, 50))
