"""The Ray backend against the local ones (process pool and in-process), on a real Ray instance this test
starts on this machine. Slow: Ray's start-up and each spawned worker's torch import take most of a minute
on a loaded 2-core machine."""

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from keel.proxy.sweep import RayBackend, run_sweep
from tests.proxy.sweep._dies import kills_its_first_worker, kills_its_worker
from tests.proxy.sweep.conftest import RESULT_KEYS as KEYS

ray = pytest.importorskip("ray")


@pytest.fixture
def local_ray():
    """A Ray instance of 2 CPUs in this process for one test (address="local": never a cluster Ray finds, such as a
    dead one's record), then this process as it was: ray.init sets SIGTERM's handler and environment variables
    (PYTHONBREAKPOINT, RAY_AUTH_MODE, ...) that ray.shutdown leaves."""
    environ, handler = set(os.environ), signal.getsignal(signal.SIGTERM)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, handler)
        for name in set(os.environ) - environ:
            del os.environ[name]


@pytest.mark.slow
def test_ray_backend_gives_the_local_backends_metrics(tmp_path, tiny_sweep, local_ray):
    def broken(base):
        raise ValueError("recipe fails")

    config = tiny_sweep(recipes=["baseline", "qk_norm_z_loss", broken], lrs=[1e-2, 3e-2])
    local = run_sweep(config, tmp_path / "local", backend="local", workers=2)
    in_process = run_sweep(config, tmp_path / "in_process", backend="local", workers=1)
    remote = run_sweep(config, tmp_path / "ray", backend=RayBackend())  # on the local_ray instance
    assert sorted(remote.ran) == sorted(local.ran) and len(remote.ran) == 6
    by_id = {r["run_id"]: r for r in local.rows}
    for row in [*remote.rows, *in_process.rows]:  # bit-identical: one torch thread per run everywhere
        assert [row[k] for k in KEYS] == [by_id[row["run_id"]][k] for k in KEYS]
    assert by_id["baseline/tiny/lr=0.01/seed=0"]["val_loss"] != by_id["qk_norm_z_loss/tiny/lr=0.01/seed=0"]["val_loss"]
    assert [c.sensitivity for c in remote.curves] == [c.sensitivity for c in local.curves]
    assert {r["status"] for r in remote.rows} == {"done", "error"}


@pytest.mark.slow
def test_a_run_whose_ray_worker_dies_runs_once_more(tmp_path, tiny_sweep, local_ray):
    # A worker lost once (SIGKILL mid-run, /tmp/h28S/s2_kill_worker.out) was recorded as an error at once, where the
    # local backend re-runs such a run; now Ray runs it once more, and only a run that kills its worker twice is
    # an error. The runs beside them are unaffected.
    def unshippable(base):  # a hook closing over a lock: Ray cannot serialize the run (the sweep ended, exit 1)
        lock = threading.Lock()
        return dataclasses.replace(base, lr_factor=lambda step: 1.0 if lock else 0.0)

    died_once = kills_its_first_worker(str(tmp_path / "died-once"))
    config = tiny_sweep(recipes=["baseline", died_once, kills_its_worker, unshippable], lrs=[1e-2])
    remote = run_sweep(config, tmp_path / "ray", backend=RayBackend())  # on the local_ray instance
    rows = {r["recipe"]: r for r in remote.rows}
    assert rows["baseline"]["status"] == "done" and (tmp_path / "died-once").exists()
    assert rows["kills_its_first_worker"]["status"] == "done"
    assert rows["kills_its_first_worker"]["val_loss"] == rows["baseline"]["val_loss"]  # the same training
    assert rows["kills_its_worker"]["status"] == "error" and "worker failed" in rows["kills_its_worker"]["error"]
    assert rows["unshippable"]["status"] == "error" and "Could not serialize" in rows["unshippable"]["error"]
    assert [r["attempts"] for r in remote.rows] == [1, 1, 1, 1]


@pytest.mark.slow
def test_sigterm_ends_a_ray_sweep_as_keel_sweep_says(tmp_path):
    # ray.init replaced the CLI's SIGTERM handler: `kill PID` on a Ray sweep was a C++ stack dump and exit -6
    # (SIGABRT), not "keel sweep: terminated (SIGTERM); the same command resumes it" and 143 (/tmp/h28S/s12_*.out).
    command = [sys.executable, "-m", "keel.cli", "sweep", "--recipes", "baseline", "--sizes", "tiny", "--lrs", "1e-2"]
    command += ["--steps", "2000", "--batch-size", "2", "--seq-len", "8", "--eval-batches", "1", "--no-plots"]
    command += ["--backend", "ray", "--address", "local", "--workers", "1", "--out", str(tmp_path / "sweep")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in sweep.stderr:  # Ray's own "Started a local Ray instance." line, then the run starts
            if "Started a local Ray instance" in line:
                break
        time.sleep(2)
        sweep.send_signal(signal.SIGTERM)
        said = sweep.stderr.read()
        assert sweep.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        sweep.kill()
    assert "keel sweep: terminated (SIGTERM); the same command resumes it" in said and "SIGTERM received" not in said
