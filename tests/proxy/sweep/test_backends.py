"""The backends' own logic, fast: the Ray backend driven through an in-process stand-in for ``ray`` (the real
Ray instance is in test_ray.py, slow), and backend selection."""

import os
import re
import signal
import socket
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel._core.errors import KeelWarning
from keel.cli import main
from keel.proxy.sweep import LocalBackend, RayBackend, create_backend, expand_grid, run_sweep
from keel.proxy.sweep.backends.local import available_cores
from keel.proxy.sweep.grid import RunSpec
from keel.proxy.sweep.worker import RunResult
from tests.proxy.sweep.conftest import RESULT_KEYS as KEYS


class _Ref:
    def __init__(self, thunk):
        self.thunk, self.done, self.value, self.error = thunk, False, None, None

    def run(self):
        try:
            self.value = self.thunk()
        except Exception as exc:  # noqa: BLE001 - kept for get(), as Ray keeps a task's exception
            self.error = exc
        self.done = True


class FakeRay:
    """Just enough of ``ray`` for `RayBackend`: tasks run when waited on, the newest first (Ray returns them
    in completion order, which is not submission order); a task of the recipe ``crashes`` fails in get() the
    way a task whose worker died does."""

    def __init__(self, cpus=2, train=True):
        self.initialized, self.init_options, self.remote_options, self.calls = False, None, None, []
        self.train = train  # False: a task returns a done RunResult without training (dispatch tests)
        self.pick = lambda n: n - 1  # which unfinished task finishes next: the newest
        self.cpus, self.unfinished, self.most_unfinished, self.shutdowns = cpus, 0, 0, 0

    def is_initialized(self):
        return self.initialized

    def init(self, **options):
        self.initialized, self.init_options = True, options
        os.environ["PYTHONBREAKPOINT"] = "ray.util.rpdb._driver_set_trace"  # as ray.init does, with SIGTERM too
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    def shutdown(self):
        self.initialized, self.shutdowns = False, self.shutdowns + 1

    def cluster_resources(self):
        return {"CPU": float(self.cpus)}

    def remote(self, **options):
        self.remote_options = options

        def wrap(fn):
            fake = self

            class Remote:
                @staticmethod
                def remote(spec, run_dir, **kwargs):
                    fake.calls.append((spec.run_id, kwargs))
                    if spec.recipe == "unshippable":  # as Ray's serializer refuses a hook closing over a lock
                        raise TypeError(f"Could not serialize the argument {spec!r}")
                    fake.unfinished += 1
                    fake.most_unfinished = max(fake.most_unfinished, fake.unfinished)
                    if spec.recipe == "crashes":
                        return _Ref(lambda: (_ for _ in ()).throw(RuntimeError("worker died")))
                    if not fake.train:
                        return _Ref(lambda: RunResult(run_id=spec.run_id, status="done"))
                    return _Ref(lambda: fn(spec, run_dir, **kwargs))

            return Remote

        return wrap

    def wait(self, refs, num_returns=1):
        ref = refs[self.pick(len(refs))]
        ref.run()
        self.unfinished -= 1
        return [ref], refs[:-1]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def cancel(self, ref, force=False):
        pass


def crashes(base):
    return base


def unshippable(base):
    return base


def test_ray_backend_ships_each_run_as_one_task_with_the_local_metrics(tmp_path, tiny_sweep, monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    handler = signal.getsignal(signal.SIGTERM)
    # unshippable: Ray cannot serialize its run; the whole sweep ended "internal error: TypeError" (exit 1), where
    # the local backend records that run's error and goes on (/tmp/h28S/s15_unpicklable.out)
    config = tiny_sweep(recipes=["baseline", "qk_norm_z_loss", crashes, unshippable], lrs=[3e-2], steps=2)
    remote = run_sweep(config, tmp_path / "ray", backend=RayBackend(num_cpus=2))
    local = run_sweep(config, tmp_path / "local", workers=1)
    assert fake.init_options == {
        "address": None,
        "include_dashboard": False,
        "log_to_driver": False,
        "num_cpus": 2,
    }
    # max_retries=1: a run whose worker died runs once more, as the local backend re-runs it (was 0: an error at once)
    assert fake.remote_options == {"num_cpus": 1, "max_retries": 1}
    assert fake.shutdowns == 1  # the Ray instance it started ends with the sweep
    # and what ray.init changed in this process is put back: breakpoint() went to Ray's debugger after the sweep,
    # and `kill PID` was Ray's C++ stack dump and SIGABRT instead of keel sweep's "terminated (SIGTERM)"
    assert "PYTHONBREAKPOINT" not in os.environ and signal.getsignal(signal.SIGTERM) is handler
    assert len(fake.calls) == 4 and all(kwargs == {"threads": 1} for _, kwargs in fake.calls)
    assert remote.ran != local.ran and sorted(remote.ran) == sorted(local.ran)  # completion order differs
    by_id = {r["run_id"]: r for r in local.rows}
    for row in remote.rows:
        mine = by_id[row["run_id"]]
        if row["recipe"] == "crashes":  # a lost worker is an error for that run only; the sweep goes on
            assert row["status"] == "error" and row["error"] == "worker failed: RuntimeError: worker died"
            assert mine["status"] == "done"
        elif row["recipe"] == "unshippable":
            assert row["status"] == "error" and row["error"].startswith("worker failed: TypeError: Could not serial")
            assert mine["status"] == "done"
        else:
            assert [row[k] for k in KEYS] == [mine[k] for k in KEYS]
    assert [c.sensitivity for c in remote.curves] == [c.sensitivity for c in local.curves[:2]]


def test_create_backend_by_name():
    local = create_backend("local", workers=available_cores())
    assert isinstance(local, LocalBackend) and local.workers == available_cores()
    ray_backend = create_backend("ray", address="auto", workers=4)
    assert isinstance(ray_backend, RayBackend) and (ray_backend.address, ray_backend.num_cpus) == ("auto", 4)
    with pytest.raises(ValueError, match="unknown sweep backend 'dask'; allowed: local, ray"):
        create_backend("dask")
    with pytest.raises(ValueError, match="workers=0; allowed: an int >= 1"):
        LocalBackend(workers=0)


def test_more_local_workers_than_cores_is_said_once_and_allowed():
    cores = available_cores()
    with pytest.warns(KeelWarning, match=rf"workers={cores + 1} is more than the {cores} cores .* allowed without"):
        assert LocalBackend(workers=cores + 1).workers == cores + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LocalBackend(workers=cores).workers == LocalBackend().workers == cores


@pytest.mark.slow  # two spawned workers import torch (~10 s)
def test_the_local_pool_marks_no_more_runs_running_than_it_has_workers(tmp_path, tiny_sweep):
    # with one run queued per worker beyond the running ones, 4 of 6 runs read "running" while 2 ran (closing16)
    specs = expand_grid(tiny_sweep(lrs=[1e-3, 3e-3, 1e-2], seeds=[0, 1]))
    tasks = [(spec, str(tmp_path / str(i))) for i, spec in enumerate(specs)]
    started, in_flight = [], []
    backend = LocalBackend(workers=2)
    results = backend.run(tasks, lambda spec: (started.append(spec.run_id), in_flight.append(len(started) - done)))
    done = 0
    for result in results:
        assert result.status == "done"
        done += 1
    assert sorted(started) == sorted(s.run_id for s in specs) and done == len(specs)
    assert max(in_flight) == 2  # never a third "running" run while two ran


@pytest.mark.parametrize("cpus, num_cpus, most", [(2, None, 2), (3, None, 3), (0, None, 1), (8, 2, 2)])
def test_ray_backend_hands_ray_only_the_runs_it_can_start(tmp_path, tiny_sweep, monkeypatch, cpus, num_cpus, most):
    # Every run was submitted (and marked running in the store) at once: 4 of 6 runs read "running" while 2 ran,
    # and a killed sweep's resume counted an attempt for each run that never started (/tmp/h28S/s7_sigint.out).
    fake = FakeRay(cpus=cpus, train=False)
    fake.initialized = True  # a Ray connection the caller made: neither started nor shut down here
    monkeypatch.setitem(sys.modules, "ray", fake)
    specs = expand_grid(tiny_sweep(recipes=["baseline"], lrs=[1e-2, 2e-2, 3e-2, 4e-2, 5e-2, 6e-2]))
    unfinished_at_start = []

    def on_start(spec):
        unfinished_at_start.append(fake.unfinished)

    results = list(RayBackend(num_cpus=num_cpus).run([(spec, str(tmp_path)) for spec in specs], on_start))
    assert sorted(r.run_id for r in results) == sorted(s.run_id for s in specs)
    assert max(unfinished_at_start) == most - 1 and fake.most_unfinished == most
    assert fake.init_options is None and fake.shutdowns == 0


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cpus=st.integers(0, 6),
    num_cpus=st.none() | st.integers(1, 6),
    n_tasks=st.integers(0, 12),
    order=st.randoms(use_true_random=False),
)
def test_ray_backend_dispatch_in_any_completion_order(tmp_path, monkeypatch, cpus, num_cpus, n_tasks, order):
    # Attack the dispatch window: whatever order Ray finishes tasks in, every run is started once and yields once,
    # and no more runs are unfinished in Ray than the window allows.
    fake = FakeRay(cpus=cpus, train=False)
    fake.initialized = True
    fake.pick = lambda n: order.randrange(n)
    monkeypatch.setitem(sys.modules, "ray", fake)
    specs = [RunSpec(run_id=f"r{i}", recipe="r", size="tiny", lr=1.0, seed=i, config=None) for i in range(n_tasks)]
    started = []
    results = list(RayBackend(num_cpus=num_cpus).run([(s, str(tmp_path)) for s in specs], lambda s: started.append(s)))
    assert sorted(r.run_id for r in results) == sorted(s.run_id for s in started) == sorted(s.run_id for s in specs)
    assert fake.most_unfinished <= (num_cpus or max(1, cpus)) and fake.unfinished == 0


def test_ray_backend_without_ray_is_one_error_before_the_sweep_store(tmp_path, monkeypatch, capsys):
    # A Ray that fails to import (here: a shadow `ray` raising a bare ImportError, as a broken install's C extension
    # does) was "internal error … (a keel bug)", exit 1, after the sweep store had been written.
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('libray.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(shadow.parent))
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    out = tmp_path / "sweep"
    argv = ["sweep", "--recipes", "baseline", "--sizes", "tiny", "--lrs", "1e-2", "--steps", "1", "--no-plots"]
    assert main([*argv, "--backend", "ray", "--out", str(out)]) == 2
    assert "keel sweep: error: the Ray sweep backend needs Ray: pip install 'keel[ray]'" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ImportError, match="needs Ray") as caught:
        RayBackend()
    assert caught.value.name == "ray"


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("how", ["address", "RAY_ADDRESS", "RAY_ADDRESS ray://", "record"])
def test_a_ray_cluster_that_does_not_answer_is_one_error_at_once(tmp_path, monkeypatch, how):
    # A dead address hung the sweep for ~14 minutes of Ray's retries (/tmp/h28S/s5_bad_address.out: still trying
    # after 300 s), and so did plain --backend ray once a `ray start` cluster had died without `ray stop`
    # (/tmp/h28S/s6_stale_cluster.out): Ray's record of it, /tmp/ray/ray_current_cluster, outlives it.
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process is connected to Ray already")
    dead = f"127.0.0.1:{_closed_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's record of the last cluster is read from here
    address = None
    if how == "address":
        address = dead
    elif how.startswith("RAY_ADDRESS"):  # a Ray Client address there is Ray Client's, not "Invalid address format"
        monkeypatch.setenv("RAY_ADDRESS", "ray://" + dead if "ray://" in how else dead)
    else:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    source = {"address": f"the address given ({dead})", "record": "Ray's record"}.get(how, "RAY_ADDRESS")
    with pytest.raises(
        ConnectionError, match=rf"no Ray cluster answers at \S+:{dead.split(':')[1]}, from {re.escape(source)}"
    ):
        next(RayBackend(address=address, num_cpus=2).run([], lambda spec: None))
    assert not ray.is_initialized()
    # through the CLI: one line, exit 2, and no sweep store left behind (it held the grid, refusing other settings)
    argv = ["sweep", "--recipes", "baseline", "--sizes", "tiny", "--lrs", "1e-2", "--no-plots", "--backend", "ray"]
    assert main([*argv, *(["--address", address] if address else []), "--out", str(tmp_path / "sweep")]) == 2
    assert not (tmp_path / "sweep").exists()
