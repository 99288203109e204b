"""A stopped sweep stops its workers: the local backend's pool is ended at once (Ctrl-C, SIGTERM, an error), and a
worker whose parent is gone ends itself. Before, Ctrl-C waited for every run already handed to a worker and
``kill PID`` left the workers running for good (reviewer V1, V2)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from keel.proxy.sweep.backends.local import stop_workers


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie not yet reaped counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while its /proc entry is read (ESRCH)
        return True
    return "State:\tZ" in state


def _wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_stop_workers_ends_runs_in_flight_and_queued_ones_fail():
    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(time.sleep, 60) for _ in range(4)]
    assert _wait_until(lambda: len(pool._processes or {}) == 2)
    pids = list(pool._processes)
    stop_workers(pool)
    assert _wait_until(lambda: all(_gone(pid) for pid in pids)), "a worker outlived stop_workers"
    assert _wait_until(lambda: all(f.done() for f in futures))
    assert all(f.exception() is not None for f in futures)  # none ran to its end


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_worker_whose_parent_is_gone_ends_itself(tmp_path):
    # A (a python process) starts B, which watches for A with exit_with_parent, then A exits without a word to B
    child = textwrap.dedent(
        """
        import sys, time
        from keel.proxy.sweep.backends.local import exit_with_parent
        exit_with_parent(int(sys.argv[1]), every=0.05)  # the pool passes the driver's pid, as here
        time.sleep(60)
        """
    )
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys
        b = subprocess.Popen(
            [sys.executable, "-c", {child!r}, str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        print(b.pid, flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True, timeout=60)
    pid = int(out.stdout.split()[0])
    try:
        assert _wait_until(lambda: _gone(pid)), "the worker kept running after its parent exited"
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


@pytest.mark.slow  # a real `keel sweep --workers 2` (spawned workers import torch): ~20 s
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
@pytest.mark.parametrize(
    "sig, code, said",
    [(signal.SIGTERM, 143, "keel sweep: terminated (SIGTERM); the same command resumes it"), (signal.SIGINT, 130, "")],
)
def test_a_signalled_sweep_exits_soon_and_leaves_no_worker(tmp_path, sig, code, said):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "keel.cli", "sweep", "--recipes", "baseline", "--sizes", "tiny", "--workers", "2"]
    cmd += ["--eval-batches", "1", "--no-plots", "--lrs", "1e-3", "1e-2", "3e-2", "--steps", "5000", "--out", str(out)]
    err = tmp_path / "stderr"
    driver = subprocess.Popen(
        cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=err.open("w")
    )
    try:
        # both workers started and running a run: the run stores exist
        assert _wait_until(lambda: len(list(out.glob("runs/*/*/*/*/run.sqlite"))) >= 2, timeout=120)
        workers = [c for c in _children(driver.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2
        driver.send_signal(sig)  # the driver alone, as `kill PID` or a job scheduler does
        assert driver.wait(timeout=60) == code
        assert _wait_until(lambda: all(_gone(w) for w in workers)), "a worker outlived the sweep"
        # SIGTERM ended the sweep without a word (reviewer W, session 15); Ctrl-C's line comes from keel.cli
        assert said in err.read_text()
    finally:
        if driver.poll() is None:
            driver.kill()
