"""policy='recover': rollback past a bad data window, the actions after it, resume bit-for-bit after kill -9."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from keel import Guard, RecoveryConfig
from keel.proxy.trainer import TrainConfig, train_proxy
from keel.store import RunReader
from tests.conftest import TinyNet, make_batches


def _zero_targets(start: int, length: int = 20):
    def batch_fn(step, batch):
        x, y = batch
        return (x, torch.zeros_like(y)) if start <= step < start + length else (x, y)

    return batch_fn


def test_poisoned_stream_recovers_to_within_3_percent_of_healthy(tmp_path):
    config = TrainConfig(size="tiny", steps=300, lr=1e-2, warmup=20)
    healthy = train_proxy(config)
    poisoned = dataclasses.replace(config, batch_fn=_zero_targets(260))
    bare = train_proxy(poisoned)
    recovered = train_proxy(poisoned, policy="recover", run_dir=str(tmp_path))
    assert recovered.aborted is None
    assert abs(recovered.val_loss / healthy.val_loss - 1) < 0.03
    assert bare.val_loss / healthy.val_loss - 1 >= 0.20
    rollbacks = [d for d in recovered.decisions if d.action == "rollback"]
    # the third spike in a row blames the weights (rollback at 262); the spikes go on with the restored weights, so
    # they are the data: skipped up to the cap, then the second rollback goes further back (no update ran between)
    assert [r.step for r in rollbacks][0] == 262 and len(rollbacks) == 2
    assert all(r.restored_step < 260 for r in rollbacks) and rollbacks[0].onset >= 250
    with RunReader(tmp_path) as r:
        stored = [d for d in r.decisions() if d.action == "rollback"]
        assert [d.restored_step for d in stored] == [d.restored_step for d in rollbacks]
        assert "not replayed" in stored[0].reason


def test_corrupted_parameters_are_rolled_back():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model, opt, policy="recover", max_consecutive_skips=3, recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1)
    )
    actions = []
    for step, (x, y) in enumerate(make_batches(40)):
        if step == 23:
            with torch.no_grad():
                model.fc1.weight[0, 0] = float("nan")  # a bit flip in memory
        loss = F.mse_loss(model(x), y)
        loss.backward()
        actions.append(guard.step(loss).action)
        opt.zero_grad()
    guard.close()
    assert actions[23] == "rollback"  # at once: the parameters are read on a non-finite step; no skip mends them
    assert all(a == "ok" for a in actions[24:])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    [rollback] = [d for d in guard.decisions if d.action == "rollback"]
    assert rollback.restored_step <= 22


def test_lr_backoff_applies_around_the_step_only():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)  # chainable: reads group["lr"]
    guard = Guard(model, opt, sched, policy="recover")
    guard.recovery.actions.lr_scale = 0.1
    x, y = make_batches(1)[0]
    before = model.fc1.weight.detach().clone()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    grad = model.fc1.weight.grad.clone()
    guard.step(loss)
    torch.testing.assert_close(model.fc1.weight, before - 0.01 * grad)
    assert sched.get_last_lr() == [0.05]  # the scheduler never saw the scale


RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch, torch.nn.functional as F
    from keel import Guard, RecoveryConfig
    from keel.proxy import ProxyBatches, create_proxy_model
    run_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    batches = ProxyBatches(batch_size=8, seq_len=32, seed=0)
    guard = Guard(model, opt, sched, run_dir=run_dir, policy="recover", resume=resume,
                  recovery=RecoveryConfig(snapshot_every=10, disk_every=1))
    guard.track(batches)
    for step in range(guard.global_step, 100):
        x, y = batches.next()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
        print(step, repr(loss.item()), flush=True)
        if step == kill_at:
            guard.recovery.disk.wait()  # the snapshot of about step 50 is on disk
            os.kill(os.getpid(), signal.SIGKILL)
    guard.close()
""")


def _losses(out: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in (line.split() for line in out.strip().splitlines())}


@pytest.mark.slow  # `make test-all`; test_resume.py and guard/test_run_dir.py kill and resume by default
def test_resume_after_kill_9_continues_bit_for_bit(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    full = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a"), "-1", "0"], capture_output=True, text=True, env=env
    )
    assert full.returncode == 0, full.stderr
    killed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "b"), "54", "0"], capture_output=True, text=True, env=env
    )
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "b"), "-1", "1"], capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    reference, after = _losses(full.stdout), _losses(resumed.stdout)
    with RunReader(tmp_path / "b") as r:
        start = r.meta()["resumed_from"]
        assert r.snapshots()
    assert 45 <= start <= 55 and min(after) == start and max(after) == 99  # snapshots every 10 steps
    assert all(after[s] == reference[s] for s in range(start, 100))  # exact, not approximate
    assert not any(math.isnan(v) for v in after.values())


def test_a_failing_rollback_never_kills_training(monkeypatch):
    import keel.recover.recovery as recovery_module

    def broken(*args, **kwargs):
        raise RuntimeError("restore bug")

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model, opt, policy="recover", max_consecutive_skips=2, recovery=RecoveryConfig(snapshot_every=2, quiet_steps=1)
    )
    monkeypatch.setattr(recovery_module, "restore", broken)
    decisions = []
    for step, (x, y) in enumerate(make_batches(12)):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if 6 <= step < 9:
            model.fc2.weight.grad.fill_(float("inf"))
        decisions.append(guard.step(loss))
        opt.zero_grad()
    assert [d.action for d in decisions[6:9]] == ["skip", "skip", "skip"]
    assert "rollback failed (RuntimeError: restore bug)" in decisions[8].reason
    assert all(d.action == "ok" for d in decisions[9:])


def test_full_disk_degrades_to_memory_snapshots_with_a_warning(tmp_path, monkeypatch):
    import pytest

    import keel.recover.disk as disk_module

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_module, "save_file", full)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model,
        opt,
        policy="recover",
        run_dir=str(tmp_path),
        max_consecutive_skips=2,
        recovery=RecoveryConfig(snapshot_every=3, quiet_steps=1, disk_every=1),
    )
    actions = []
    with pytest.warns(Warning, match="No space left on device"):
        for step, (x, y) in enumerate(make_batches(30)):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if 20 <= step < 23:
                model.fc1.bias.grad.fill_(float("nan"))
            actions.append(guard.step(loss).action)
            opt.zero_grad()
            guard.recovery.disk.wait()
    guard.close()
    assert actions[20:23] == ["skip", "skip", "rollback"]  # the memory ring still serves the rollback
    assert guard.recovery.disk.failures > 0 and guard.recovery.disk.complete() == []
    assert all(a == "ok" for a in actions[23:])
