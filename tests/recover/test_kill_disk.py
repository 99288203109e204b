"""A process killed (SIGKILL) while the disk tier deletes a snapshot — retention after a newer write, or a rollback
dropping the abandoned timeline — leaves no half-deleted ``step-<N>`` folder: a resume finds only whole snapshots
(no `SnapshotCorrupt` warning), and the next claim of the run_dir deletes what is left. The kill is real: an
audit hook sends SIGKILL when the subprocess has deleted one file."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from keel.guard.run_dir import RunDir
from keel.recover import DiskSnapshots, SnapshotRing, TrainingState
from keel.recover.disk_format import read_snapshot
from keel.store import RunReader
from keel.store.writer import RunWriter

KILLED_WHILE_DELETING = textwrap.dedent("""
    import os, signal, sys
    import torch
    from keel.recover import DiskSnapshots, SnapshotRing, TrainingState
    model = torch.nn.Linear(4, 2)
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    disk = DiskSnapshots(sys.argv[1], keep=2, run_id="a" * 32)

    def save(step):
        ring = SnapshotRing()
        snap = ring.take(step, state)
        ring.fence()
        disk.save(snap)

    save(10)
    save(20)

    deleted = []

    def kill_at_the_second_deletion(event, args):  # (the audit event comes before the deletion)
        if event in ("os.remove", "os.rmdir"):
            deleted.append(args[0])
            if len(deleted) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(kill_at_the_second_deletion)
    save(30) if sys.argv[2] == "retention" else disk.drop_after(10)
""")


def _killed_while_deleting(run_dir, stage):
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_DELETING, str(run_dir / "snapshots"), stage],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr


def _steps_loaded_without_warnings(run_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a SnapshotCorrupt here fails the test
        disk = DiskSnapshots(run_dir / "snapshots", keep=2, run_id="a" * 32)
        newest = disk.load_newest("a" * 32)
        return [newest.step, *(snap.step for snap in disk.load_older(5))]


@pytest.mark.parametrize(
    "stage,left",
    [
        ("retention", [30, 20]),  # 30 was in place when 10's deletion began
        pytest.param("drop", [10], marks=pytest.mark.slow),  # 20 was being deleted: a later rollback's timeline
    ],
)
def test_a_kill_while_a_snapshot_is_deleted_leaves_only_whole_snapshots(tmp_path, stage, left):
    _killed_while_deleting(tmp_path, stage)
    folders = sorted((tmp_path / "snapshots").iterdir())
    for folder in folders:
        if folder.name.startswith("step-"):
            read_snapshot(folder)  # raises SnapshotInvalid for a half-deleted one
    assert _steps_loaded_without_warnings(tmp_path) == left
    RunDir.claim(str(tmp_path), resume=True, overwrite=False).release()  # deletes what the kill left
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [f"step-{s:09d}" for s in sorted(left)]


def test_a_snapshot_is_published_only_after_the_rows_before_it_are_committed(tmp_path):
    """With the run store's flush as ``before_publish`` (a Guard's wiring), a process killed right after a disk
    snapshot appeared leaves a store holding every step before it: nothing for a resume to warn about as lost."""
    model = torch.nn.Linear(4, 2)
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    seen: list[tuple[list[int], bool]] = []
    with RunWriter(tmp_path, flush_interval=3600.0) as writer:  # nothing is committed unless flushed

        def flush_then_look() -> None:
            writer.flush()
            with RunReader(tmp_path) as store:
                seen.append((list(store.signal("loss")[0]), (tmp_path / "snapshots" / "step-000000003").exists()))

        disk = DiskSnapshots(tmp_path / "snapshots", run_id="a" * 32, before_publish=flush_then_look)
        for step in range(3):
            writer.add_signals(step, {"loss": 1.0})
        ring = SnapshotRing()
        snap = ring.take(3, state)
        ring.fence()
        disk.save(snap)
    assert seen == [([0, 1, 2], False)]  # committed, and the snapshot not yet in place


KILLED_WHILE_WRITING_THE_SKIP_LIST = textwrap.dedent("""
    import os, signal, sys
    from keel.data.skip_list import SkipEntry, SkipList

    def kill_before_the_rename(event, args):  # the partial file is written whole by then
        if event == "os.rename" and str(args[0]).endswith(".partial"):
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(kill_before_the_rename)
    SkipList(sys.argv[1]).add(SkipEntry(kind="examples", first_step=3, last_step=3, ids=(7,), reason="spike"))
""")


@pytest.mark.slow  # a subprocess that imports torch
def test_the_partial_skip_list_a_killed_write_left_is_deleted_by_the_next_claim(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING_THE_SKIP_LIST, str(tmp_path)], capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    [partial] = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert partial.startswith(".skip_list.json.")
    RunDir.claim(str(tmp_path), resume=True, overwrite=False).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keel.lock"]
