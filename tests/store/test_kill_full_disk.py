"""A run store left by a process killed with ``kill -9``, opened again on a disk that has no room left (a run
restarted by a preemptible machine's scheduler after its disk filled up). The disk is made full for one
subprocess with a file-size limit at the size of the store's largest file: every write that makes a file larger
than that fails as it does on a full disk (SQLite: "database or disk is full")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from keel.store import RunReader
from keel.store.writer import RunWriter

KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from keel.store.writer import RunWriter
    writer = RunWriter(sys.argv[1])
    writer.set_meta({"status": "running"})
    for step in range(5):
        writer.add_signals(step, {"loss": 1.0 / (step + 1)})
    writer.flush()
    os._exit(0)  # as kill -9 would: no close, the -wal and -shm files stay
""")

ON_A_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, warnings
    from keel.store.schema import StoreError
    from keel.store.writer import RunWriter
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            writer = RunWriter(sys.argv[1])
        except StoreError as exc:
            print("refused:", exc)
            sys.exit(0)
        writer.drop_from(3)
        writer.add_signals(3, {"loss": 9.0})
        writer.flush()
        writer.close()
    print("opened; errors:", writer.errors, "; warned:", [str(w.message) for w in caught])
""")


def _run(script: str, run_dir, limit: int = 0) -> str:
    command = [sys.executable, "-c", script, str(run_dir), str(limit)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_killed_runs_store_opens_on_a_full_disk_and_its_writes_are_dropped_with_a_warning(tmp_path):
    _run(KILLED_WRITER, tmp_path)
    assert (tmp_path / "run.sqlite-wal").exists()
    out = _run(ON_A_FULL_DISK, tmp_path, max(f.stat().st_size for f in tmp_path.iterdir()))  # no file may grow
    assert out.startswith("opened; errors: 6 ;"), out  # drop_from's 5 deletes and the signal row
    assert "could not be written" in out and "training goes on" in out
    with RunReader(tmp_path) as store:  # what the killed run committed is all there
        assert list(store.signal("loss")[0]) == [0, 1, 2, 3, 4]


def test_a_store_that_cannot_be_opened_on_a_full_disk_is_one_store_error_naming_it(tmp_path):
    RunWriter(tmp_path).close()  # closed cleanly: opening it creates its -shm file (32 KiB), which needs room
    out = _run(ON_A_FULL_DISK, tmp_path, 16384)
    assert out.startswith(f"refused: {tmp_path / 'run.sqlite'}: cannot be opened for writing"), out
