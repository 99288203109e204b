"""A preemptible HF Trainer job restarted with the same command (run_clm.py's shape: ``resume_from_checkpoint=
get_last_checkpoint(output_dir)`` and one ``KeelCallback(run_dir=output_dir/keel)``) keeps one keel history across
SIGKILLs (reviewer R's R8, session 16): before, the restart was refused as "a previous run", and with
``overwrite=True`` keel deleted its own store at every restart (after three restarts it held the last segment only).

Each segment runs in a forked child that SIGKILLs itself, as a preempted job ends: no ``on_train_end``, no close, the
store's last half second uncommitted. The children share the test process's imports, so a kill and a restart cost
two short trainings, not two interpreter starts."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

import keel  # noqa: E402
from keel._core import keys  # noqa: E402
from keel.integrations.hf import KeelCallback  # noqa: E402
from keel.store import RunReader  # noqa: E402
from tests.integrations._forked import run_forked  # noqa: E402
from tests.integrations.test_hf import train  # noqa: E402

STEPS, SAVE = 12, 4


class Preempt(TrainerCallback):
    """SIGKILL at the end of update ``at`` (after the Trainer's save of it, when it saves there)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at and not control.should_save:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def _job(out, kill_at: int | None) -> None:
    """The job's one command: resume from the newest checkpoint in ``out`` if there is one."""
    out.mkdir(exist_ok=True)
    callbacks = [KeelCallback(run_dir=str(out / "keel"), policy="recover")]
    callbacks += [Preempt(kill_at)] if kill_at is not None else []
    trainer = train(
        out,
        callbacks,
        steps=STEPS,
        accumulate=1,
        save_strategy="steps",
        save_steps=SAVE,
        resume=get_last_checkpoint(str(out / "hf")) if (out / "hf").is_dir() else None,
    )
    torch.save(trainer.model.state_dict(), out / "final.pt")


def _run(out, kill_at: int | None = None) -> int:
    """Run the job in a forked child; its wait status's signal (SIGKILL: preempted), or 0 when it finished."""
    return run_forked(out, lambda: _job(out, kill_at))


def _loss_steps(run_dir) -> list[int]:
    import sqlite3

    conn = sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True)
    try:
        return [s for (s,) in conn.execute("SELECT step FROM signals WHERE key = 'loss' ORDER BY step")]
    finally:
        conn.close()


def _same_weights(a, b) -> bool:
    x, y = torch.load(a / "final.pt"), torch.load(b / "final.pt")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_job_killed_between_two_checkpoints_and_run_again_keeps_one_store_with_every_step_once(tmp_path):
    job, whole = tmp_path / "job", tmp_path / "whole"
    assert _run(job, kill_at=6) == signal.SIGKILL  # checkpoint-4 on disk; steps 4, 5 done and lost with the process
    assert _loss_steps(job / "keel")[:4] == [0, 1, 2, 3]  # flushed before the save: the checkpoint's steps are stored
    with RunReader(job / "keel") as store:
        first_id = store.meta()["run_id"]
    assert _run(job) == 0
    assert _run(whole) == 0
    with RunReader(job / "keel") as store:
        meta = store.meta()
    assert meta["run_id"] == first_id and meta["status"] == "finished" and meta["resumed_from"] == 4
    assert _loss_steps(job / "keel") == list(range(STEPS))  # every step once: 4 and 5 were done again, not twice
    assert _same_weights(job, whole)
    said = (job / "console.log").read_text()
    assert said.count(f"keel continues that run in {job / 'keel'}") == 1
    assert f"the trainer resumed from its checkpoint at step 4, written by keel run {first_id[:8]}" in said


def _a_store(run_dir, *, output_dir: str = "elsewhere", fails: bool = False) -> str:
    """A keel run in ``run_dir`` (one step) of a Trainer writing to ``output_dir``, finished or failed; its run id."""
    model = torch.nn.Linear(2, 1)
    config = {"trainer": "transformers.Trainer", "args": {"output_dir": output_dir}}
    guard = keel.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=str(run_dir), config=config)
    with guard:
        model(torch.ones(1, 2)).sum().backward()
        guard.step(torch.tensor(1.0))
        if fails:
            guard.__exit__(RuntimeError, RuntimeError("killed"), None)
    return guard.run_dir.run_id


def test_a_job_stopped_before_its_first_checkpoint_starts_its_own_run_over_and_nobody_elses(tmp_path):
    """The same command after a kill before the first checkpoint: the Trainer starts at 0 with nothing to resume, and
    keel's unfinished run of the same output_dir starts over in place (it was refused as "a previous run" before,
    so the job's restart loop failed for good once the store had committed a row)."""
    assert _a_store(tmp_path / "mine", output_dir="out/hf", fails=True)
    at_zero = _resumed_state(0, None)
    assert KeelCallback(run_dir=str(tmp_path / "mine"))._continues_the_run(_ARGS, at_zero) == 0
    _a_store(tmp_path / "finished", output_dir="out/hf")
    _a_store(tmp_path / "other", output_dir="other/hf", fails=True)
    for kept in ("finished", "other"):  # a finished run, or another job's: refused by the Guard as before
        assert KeelCallback(run_dir=str(tmp_path / kept))._continues_the_run(_ARGS, at_zero) is None


_ARGS = SimpleNamespace(output_dir="out/hf")


def _resumed_state(step: int, entry: object) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, stateful_callbacks={"keel": entry})


def test_a_checkpoint_of_another_keel_run_is_refused_naming_both_runs(tmp_path):
    held = _a_store(tmp_path / "keel")
    other = "ab" * 16
    callback = KeelCallback(run_dir=str(tmp_path / "keel"), policy="recover")
    with pytest.raises(ValueError, match=rf"checkpoint of keel run {other}, but run_dir=.* holds keel run {held}"):
        callback._continues_the_run(_ARGS, _resumed_state(8, {"run_id": other}))
    assert callback._continues_the_run(_ARGS, _resumed_state(8, {"run_id": held})) == 8


@pytest.mark.parametrize(
    "entry",
    [
        None,
        "keel",
        {},
        {"run_id": None},
        {"run_id": 7},
        {"run_id": ""},
        {"run_id": ["ab" * 16]},
        {"run_id": "AB" * 16},  # ids are lower-case hex
        {"run_id": "zz" * 16},
        {"run_id": "ab" * 15},
        {"run_id": "ab" * 17},
        {"run_id": "ab" * 16 + "\n"},
    ],
)
def test_a_checkpoint_entry_that_names_no_run_continues_nothing(tmp_path, entry):
    """A hand-edited or foreign ``stateful_callbacks["keel"]``: no continuation (the Guard's claim then refuses the
    run_dir's run as before, with its own message), never a crash in the callback."""
    _a_store(tmp_path / "keel")
    callback = KeelCallback(run_dir=str(tmp_path / "keel"), policy="recover")
    assert callback._continues_the_run(_ARGS, _resumed_state(8, entry)) is None


def test_no_continuation_without_a_store_at_step_0_or_under_keels_own_resume(tmp_path):
    held = _a_store(tmp_path / "keel")
    entry = {"run_id": held}
    assert KeelCallback(run_dir=str(tmp_path / "empty"))._continues_the_run(_ARGS, _resumed_state(8, entry)) is None
    assert KeelCallback(run_dir=str(tmp_path / "keel"))._continues_the_run(_ARGS, _resumed_state(0, entry)) is None
    resumes = KeelCallback(run_dir=str(tmp_path / "keel"), resume=True)
    assert resumes._continues_the_run(_ARGS, _resumed_state(8, entry)) is None  # refused later as two resumes
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.sqlite").write_bytes(b"not a store")
    assert KeelCallback(run_dir=str(tmp_path / "bad"))._continues_the_run(_ARGS, _resumed_state(8, entry)) is None


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_four_kills_at_and_between_checkpoints_leave_the_uninterrupted_runs_history_and_weights(tmp_path):
    job, whole = tmp_path / "job", tmp_path / "whole"
    for kill_at in (2, 4, 7, 8):  # before the first checkpoint, at one, between two, at the next
        assert _run(job, kill_at=kill_at) == signal.SIGKILL
    assert _run(job) == 0
    assert _run(whole) == 0
    assert _loss_steps(job / "keel") == _loss_steps(whole / "keel") == list(range(STEPS))
    with RunReader(job / "keel") as a, RunReader(whole / "keel") as b:
        assert a.meta()["status"] == "finished" and a.meta()["steps"] == STEPS
        run_id = a.meta()["run_id"]
        ours, theirs = a.signal(keys.LOSS), b.signal(keys.LOSS)
    assert all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(ours, theirs, strict=True))
    assert _same_weights(job, whole)
    from keel.cli import main

    report = tmp_path / "report.html"
    assert main(["report", str(job / "keel"), "-o", str(report), "--quiet"]) == 0
    assert run_id in report.read_text()


def _guarded_steps(run_dir, steps: int, **kwargs) -> keel.Guard:
    """``steps`` updates of a tiny model under a Guard writing disk snapshots every step into ``run_dir``; closed."""
    model = torch.nn.Linear(2, 1)
    recovery = keel.RecoveryConfig(snapshot_every=1, disk_every=1, keep_on_disk=10)
    guard = keel.Guard(
        model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=str(run_dir), recovery=recovery, **kwargs
    )
    with guard:
        for _ in range(steps):
            model(torch.ones(1, 2)).sum().backward()
            guard.step(torch.tensor(1.0))
    return guard


def test_guard_continue_at_keeps_the_run_id_drops_later_rows_and_snapshots_and_loads_none(tmp_path):
    first = _guarded_steps(tmp_path / "run", 6)
    before = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    held = _guarded_steps(tmp_path / "run", 0, continue_at=3)  # the loop restored step 3's state, and stopped at once
    kept = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert kept == [name for name in before if int(name.split("-")[1]) <= 3] and kept  # the future past 3 deleted
    assert _loss_steps(tmp_path / "run") == [0, 1, 2]
    after = _guarded_steps(tmp_path / "run", 2, continue_at=3)
    assert held.run_dir.run_id == after.run_dir.run_id == first.run_dir.run_id and not after.resumed
    assert _loss_steps(tmp_path / "run") == [0, 1, 2, 3, 4]  # 0-2 of the first process, 3-4 of the last
    with RunReader(tmp_path / "run") as store:
        assert store.meta()["resumed_from"] == 3 and store.meta()["status"] == "finished"


@pytest.mark.parametrize(
    ("value", "others"),
    [(True, {}), (-1, {}), (2**62, {}), ("3", {}), (3.0, {}), (3, {"resume": True}), (3, {"overwrite": True})],
)
def test_guard_continue_at_refuses_what_is_not_a_step_or_is_combined_with_resume_or_overwrite(tmp_path, value, others):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"continue_at=.*allowed"):
        keel.Guard(
            model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=str(tmp_path), continue_at=value, **others
        )
