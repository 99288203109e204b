"""One run per run_dir, one open Guard per run_dir, and a resume that continues only its own run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from keel import Guard, RecoveryConfig
from keel.store import RunReader
from tests.conftest import TinyNet, make_batches


def _train(run_dir, steps=5, **kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, run_dir=str(run_dir), **kwargs)
    for x, y in make_batches(steps):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    return guard


def _open(run_dir, **kwargs):
    model = TinyNet()
    return Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=str(run_dir), **kwargs)


def test_a_run_dir_holding_a_previous_run_is_refused_naming_it_and_the_choices(tmp_path):
    _train(tmp_path, steps=5)
    with pytest.raises(ValueError) as refused:
        _open(tmp_path)
    message = str(refused.value)
    assert str(tmp_path) in message and "status finished, 5 steps" in message
    assert "resume=True" in message and "another run_dir" in message and "overwrite=True" in message
    with RunReader(tmp_path) as store:  # the refused Guard wrote nothing
        assert store.meta()["status"] == "finished" and len(store.signal("loss")[0]) == 5


@pytest.mark.parametrize("name", ["a#b", "lr=0.1?seed=0", "100%"])
def test_a_run_dir_whose_name_has_uri_characters_is_read_as_itself_and_left_as_it_was(tmp_path, name):
    run_dir = tmp_path / name
    _train(run_dir, steps=5)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="status finished, 5 steps"):
        _open(run_dir)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no stray database, no -shm/-wal


def test_snapshots_alone_are_a_previous_run_too(tmp_path):
    _train(tmp_path, steps=3, policy="recover", recovery=RecoveryConfig(snapshot_every=1, disk_every=1))
    for name in ("run.sqlite", "run.sqlite-wal", "run.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"holds a previous run: \d+ disk snapshots? in .*snapshots"):
        _open(tmp_path)


def test_overwrite_starts_a_new_run_with_nothing_of_the_old(tmp_path):
    old = _train(tmp_path, steps=8, policy="recover", recovery=RecoveryConfig(snapshot_every=1, disk_every=1))
    (tmp_path / "export").mkdir()
    (tmp_path / "notes.txt").write_text("the user's own file")
    new = _train(tmp_path, steps=3, overwrite=True)
    assert new.run_dir.run_id != old.run_dir.run_id
    with RunReader(tmp_path) as store:
        assert store.meta()["run_id"] == new.run_dir.run_id
        assert list(store.signal("loss")[0]) == [0, 1, 2] and store.snapshots() == []
    assert not (tmp_path / "snapshots").exists() and not (tmp_path / "export").exists()
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"  # only keel's files go


def test_a_run_that_recorded_no_step_is_replaced_without_asking(tmp_path):
    _open(tmp_path).close()
    guard = _train(tmp_path, steps=2)
    with RunReader(tmp_path) as store:
        assert store.meta()["run_id"] == guard.run_dir.run_id and list(store.signal("loss")[0]) == [0, 1]


def test_resume_and_overwrite_together_and_overwrite_without_run_dir_are_refused(tmp_path):
    with pytest.raises(ValueError, match="resume=True and overwrite=True"):
        _open(tmp_path, resume=True, overwrite=True)
    with pytest.raises(ValueError, match="overwrite=True needs run_dir"):
        model = TinyNet()
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), overwrite=True)
    with pytest.raises(ValueError, match="overwrite=1; allowed: True or False"):
        _open(tmp_path, overwrite=1)


def test_a_second_open_guard_on_the_same_run_dir_is_refused_until_the_first_closes(tmp_path):
    first = _open(tmp_path)
    with pytest.raises(ValueError, match=r"in use by another open Guard \(this process"):
        _open(tmp_path, overwrite=True)
    first.close()
    _open(tmp_path, resume=True).close()


def test_a_guard_that_refused_to_open_releases_the_run_dir(tmp_path):
    _train(tmp_path, steps=2)
    with pytest.raises(ValueError, match="holds a previous run"):
        _open(tmp_path)
    _open(tmp_path, overwrite=True).close()  # not "in use": the refused Guard holds no lock


HOLDER = textwrap.dedent("""
    import sys, time, torch
    from keel import Guard
    model = torch.nn.Linear(2, 2)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=sys.argv[1])
    print("open", flush=True)
    time.sleep(600)
""")


def test_a_guard_open_in_another_process_is_named_and_its_lock_dies_with_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(ValueError, match=rf"in use by another open Guard \(process {proc.pid} holds"):
            _open(tmp_path, resume=True)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    _open(tmp_path, resume=True).close()  # kill -9 left no stale lock


# --- the reported sequence: an old run's snapshots in the folder, a new run killed, then resumed ----------------
SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch, torch.nn.functional as F
    from keel import Guard, RecoveryConfig
    from keel.proxy import ProxyBatches, create_proxy_model
    run_dir, seed, steps, kill_at, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.manual_seed(seed)
    model = create_proxy_model("tiny", seq_len=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = ProxyBatches(batch_size=4, seq_len=16, seed=seed)
    try:
        guard = Guard(model, opt, run_dir=run_dir, policy="recover", resume=mode == "resume",
                      overwrite=mode == "overwrite", recovery=RecoveryConfig(snapshot_every=10, disk_every=1,
                                                                        keep_on_disk=2))
    except ValueError as exc:
        print("refused:", exc, flush=True)
        sys.exit(3)
    guard.track(batches)
    for step in range(guard.global_step, steps):
        x, y = batches.next()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
        print(step, repr(loss.item()), flush=True)
        if step == kill_at:
            guard.recovery.disk.wait()
            guard.recorder.writer.flush()  # the store holds steps 0-24, beyond the snapshot of step 20
            os.kill(os.getpid(), signal.SIGKILL)
    guard.close()
""")


def _script(tmp_path, run_dir, seed, steps, kill_at, mode):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, str(path), str(run_dir), str(seed), str(steps), str(kill_at), mode],
        capture_output=True,
        text=True,
        env=env,
    )


def _losses(out: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in (line.split() for line in out.strip().splitlines())}


def test_a_new_run_in_a_used_run_dir_resumes_its_own_snapshot_bit_for_bit(tmp_path):
    run_dir = tmp_path / "D"
    old = _script(tmp_path, run_dir, seed=1, steps=80, kill_at=-1, mode="new")  # snapshots at steps 70 and 80
    assert old.returncode == 0, old.stderr
    old_snapshots = sorted(p.name for p in (run_dir / "snapshots").iterdir())
    assert old_snapshots == ["step-000000070", "step-000000080"]
    shutil.copytree(run_dir / "snapshots", tmp_path / "old-snapshots")

    with pytest.raises(
        ValueError,
        match=r"holds a previous run: a run store \(status finished, 80 steps\) "
        r"and 2 disk snapshots",
    ):
        _open(run_dir, policy="recover")

    reference = _script(tmp_path, tmp_path / "ref", seed=2, steps=40, kill_at=-1, mode="new")
    assert reference.returncode == 0, reference.stderr
    killed = _script(tmp_path, run_dir, seed=2, steps=40, kill_at=24, mode="overwrite")
    assert killed.returncode == -signal.SIGKILL
    for folder in (tmp_path / "old-snapshots").iterdir():  # the old run's higher steps back in the folder
        shutil.copytree(folder, run_dir / "snapshots" / folder.name)

    resumed = _script(tmp_path, run_dir, seed=2, steps=40, kill_at=-1, mode="resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "snapshot(s) written by another run" in resumed.stderr
    expected, after = _losses(reference.stdout), _losses(resumed.stdout)
    with RunReader(run_dir) as store:
        start = store.meta()["resumed_from"]
        steps, _ = store.signal("loss")
    assert start == 20 and min(after) == 20 and max(after) == 39
    assert all(after[s] == expected[s] for s in after)  # exact: the new run's own snapshot, not the old run's
    assert list(steps) == list(range(40))  # one row per step: the re-done steps replaced, not duplicated
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == [
        "step-000000030",
        "step-000000040",
        *old_snapshots,
    ]  # retention deleted only this run's own


def test_partial_snapshot_writes_of_a_killed_run_are_cleared_when_the_run_dir_is_claimed(tmp_path):
    _train(tmp_path, steps=3, policy="recover", recovery=RecoveryConfig(snapshot_every=1, disk_every=1))
    leftover = tmp_path / "snapshots" / ".tmp-step-000000004-99999"  # a write killed with its process
    leftover.mkdir()
    (leftover / "tensors.safetensors").write_bytes(b"\0" * 1000)
    _train(tmp_path, steps=4, resume=True, policy="recover", recovery=RecoveryConfig(snapshot_every=1, disk_every=1))
    assert not leftover.exists()
    assert any(p.name.startswith("step-") for p in (tmp_path / "snapshots").iterdir())


def test_overwrite_clears_a_store_path_that_is_a_folder(tmp_path):
    (tmp_path / "run.sqlite").mkdir()  # not a store keel can read: refused, and overwrite clears it
    with pytest.raises(ValueError, match="a run store keel cannot read"):
        _open(tmp_path)
    _train(tmp_path, steps=2, overwrite=True)
    with RunReader(tmp_path) as store:
        assert list(store.signal("loss")[0]) == [0, 1]
