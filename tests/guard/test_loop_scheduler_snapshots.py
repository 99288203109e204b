"""A scheduler the loop steps itself (`Guard(steps_scheduler=False)`, `keel.watch`) is snapshotted as the loop leaves
it after the update, with the LRs it wrote into the optimizer: a rollback restores the optimizer and its schedule at
the same update, and a killed run resumes bit for bit. Taken with the rest inside the update, the scheduler was one
call behind (reviewer V2): after a rollback the LR schedule stayed a step late, after a resume an epoch late."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import keel
from keel import Guard, RecoveryConfig
from tests.conftest import TinyNet, make_batches


def _adam_steps(opt):
    state = opt.state_dict()["state"]
    return int(state[0]["step"]) if state else 0


@pytest.mark.parametrize("shape", ["guard", "watch"])
def test_after_a_rollback_the_schedule_is_at_the_restored_update(shape):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
    config = RecoveryConfig(snapshot_every=5, quiet_steps=1)
    guard = (
        Guard(model, opt, sched, policy="recover", steps_scheduler=False, recovery=config)
        if shape == "guard"
        else keel.watch(model, opt, sched, policy="recover", recovery=config)
    )
    lagging, actions = [], []
    for step, (x, y) in enumerate(make_batches(50)):
        loss = F.mse_loss(model(x), y) * (float("nan") if 20 <= step < 32 else 1.0)
        loss.backward()
        if shape == "guard":
            decision = guard.step(loss)
            if decision.stepped:  # as the README says for a scheduler the loop steps
                sched.step()
        else:
            opt.step()
            sched.step()
            decision = guard.decisions[-1] if guard.decisions else None
        opt.zero_grad()
        actions.append(decision.action if decision is not None else "ok")
        if _adam_steps(opt) != sched.last_epoch or opt.param_groups[0]["lr"] != pytest.approx(sched.get_last_lr()[0]):
            lagging.append((step, _adam_steps(opt), sched.last_epoch))
    guard.close()
    assert "rollback" in [d.action for d in guard.decisions]
    assert lagging == []


RUN = textwrap.dedent("""
    import hashlib, os, sys, torch, torch.nn.functional as F
    import keel
    run_dir, kill_at, resume, shape, where = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # per epoch of 10 updates
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)) for _ in range(40)]
    config = keel.RecoveryConfig(snapshot_every=5, disk_every=1)
    kw = dict(policy="recover", run_dir=run_dir, resume=resume, recovery=config)
    if shape == "guard":
        guard = keel.Guard(model, opt, sched, steps_scheduler=False, **kw)
    else:
        guard = keel.watch(model, opt, sched, **kw)
    for step in range(guard.global_step, 40):
        if where == "top" and step % 10 == 0 and step > 0:  # a new epoch steps the scheduler first
            sched.step()
        x, y = data[step]
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss) if shape == "guard" else opt.step()
        opt.zero_grad(set_to_none=True)
        if where == "end" and (step + 1) % 10 == 0:
            sched.step()
        if step == kill_at:
            os._exit(0)  # killed: no close(), no flush
    guard.close()
    digest = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    print(digest, sched.last_epoch, opt.param_groups[0]["lr"])
""")


@pytest.mark.parametrize(
    ("shape", "where"),
    [
        ("guard", "end"),
        ("guard", "top"),
        pytest.param("watch", "end", marks=pytest.mark.slow),
        pytest.param("watch", "top", marks=pytest.mark.slow),
    ],
)
def test_a_run_killed_at_an_epoch_end_resumes_with_its_epoch_schedule_bit_for_bit(
    tmp_path, shape, where, capsys, monkeypatch
):
    # end: the snapshot of step 20 is taken inside update 19, before the loop's epoch-end call: it resumed an epoch
    # late (2x LR) until the scheduler state was taken at keel's next call. top: that call is the next epoch's first
    # line, which the resumed loop runs again: held back until the first update (reviewer W5)
    script = tmp_path / "train.py"
    script.write_text(RUN)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}

    def killed_then_resumed(run_dir, kill_at, resume):
        args = [sys.executable, str(script), str(tmp_path / run_dir), str(kill_at), resume, shape, where]
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "a"), "-1", "0", shape, where])
    runpy.run_path(str(script))  # the uninterrupted run, in this process
    whole = capsys.readouterr().out.split()
    assert killed_then_resumed("b", 23, "0") == []  # the snapshot of step 20 (the epoch end) is the newest on disk
    assert killed_then_resumed("b", -1, "1") == whole


def test_held_calls_pass_once_released_and_each_scheduler_gets_its_step_back():
    from keel import Schedulers
    from keel.guard.resumed_scheduler import HeldScheduler

    opt = torch.optim.SGD(TinyNet().parameters(), lr=1.0)
    first = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    second = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    held = HeldScheduler(Schedulers(first, second))
    first.step()
    second.step()
    assert (first.last_epoch, second.last_epoch) == (0, 0)
    assert held.release() == 2
    first.step()
    assert first.last_epoch == 1
    held.close()
    assert "step" not in first.__dict__ and "step" not in second.__dict__


def test_a_resumed_guard_records_the_held_calls_once(tmp_path):
    from keel.store import RunReader

    def run(resume, steps):
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        config = RecoveryConfig(snapshot_every=5, disk_every=1)
        guard = Guard(
            model,
            opt,
            sched,
            policy="recover",
            steps_scheduler=False,
            run_dir=str(tmp_path),
            resume=resume,
            recovery=config,
        )
        for step, (x, y) in list(enumerate(make_batches(steps)))[guard.global_step :]:
            if step % 5 == 0:
                sched.step()  # the top of an "epoch" of 5
            loss = F.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
            guard.recovery.disk.wait()
        guard.close()
        return guard, sched

    run(False, 11)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="keel could not write a snapshot")  # the gate in __dict__ did
        guard, sched = run(True, 16)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir())[-1] == "step-000000015"  # written after resume
    assert guard._held_scheduler is not None and not guard._held_scheduler.holding and guard._held_scheduler.held == 1
    assert RunReader(tmp_path).meta()["scheduler_calls_held_on_resume"] == 1
    assert "step" not in sched.__dict__  # close put the scheduler's own step back
