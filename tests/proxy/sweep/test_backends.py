"""The backends' own logic, fast: the Ray backend driven through an in-process stand-in for ``ray`` (the real
Ray instance is in test_ray.py, slow), and backend selection."""

import sys

import pytest

from keel.proxy.sweep import LocalBackend, RayBackend, create_backend, run_sweep
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

    def __init__(self):
        self.initialized, self.init_options, self.remote_options, self.calls = False, None, None, []

    def is_initialized(self):
        return self.initialized

    def init(self, **options):
        self.initialized, self.init_options = True, options

    def remote(self, **options):
        self.remote_options = options

        def wrap(fn):
            fake = self

            class Remote:
                @staticmethod
                def remote(spec, run_dir, **kwargs):
                    fake.calls.append((spec.run_id, kwargs))
                    if spec.recipe == "crashes":
                        return _Ref(lambda: (_ for _ in ()).throw(RuntimeError("worker died")))
                    return _Ref(lambda: fn(spec, run_dir, **kwargs))

            return Remote

        return wrap

    def wait(self, refs, num_returns=1):
        ref = refs[-1]
        ref.run()
        return [ref], refs[:-1]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def cancel(self, ref, force=False):
        pass


def crashes(base):
    return base


def test_ray_backend_ships_each_run_as_one_task_with_the_local_metrics(tmp_path, tiny_sweep, monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    config = tiny_sweep(recipes=["baseline", "qk_norm_z_loss", crashes], lrs=[3e-2], steps=2)
    remote = run_sweep(config, tmp_path / "ray", backend=RayBackend(num_cpus=2))
    local = run_sweep(config, tmp_path / "local", workers=1)
    assert fake.init_options == {
        "address": None,
        "include_dashboard": False,
        "log_to_driver": False,
        "num_cpus": 2,
    }
    assert fake.remote_options == {"num_cpus": 1, "max_retries": 0}
    assert len(fake.calls) == 3 and all(kwargs == {"threads": 1} for _, kwargs in fake.calls)
    assert remote.ran != local.ran and sorted(remote.ran) == sorted(local.ran)  # completion order differs
    by_id = {r["run_id"]: r for r in local.rows}
    for row in remote.rows:
        mine = by_id[row["run_id"]]
        if row["recipe"] == "crashes":  # a lost worker is an error for that run only; the sweep goes on
            assert row["status"] == "error" and row["error"] == "worker failed: RuntimeError: worker died"
            assert mine["status"] == "done"
        else:
            assert [row[k] for k in KEYS] == [mine[k] for k in KEYS]
    assert [c.sensitivity for c in remote.curves] == [c.sensitivity for c in local.curves[:2]]


def test_create_backend_by_name():
    local = create_backend("local", workers=3)
    assert isinstance(local, LocalBackend) and local.workers == 3
    ray_backend = create_backend("ray", address="auto", workers=4)
    assert isinstance(ray_backend, RayBackend) and (ray_backend.address, ray_backend.num_cpus) == ("auto", 4)
    with pytest.raises(ValueError, match="unknown sweep backend 'dask'; allowed: local, ray"):
        create_backend("dask")
    with pytest.raises(ValueError, match="workers=0; allowed: an int >= 1"):
        LocalBackend(workers=0)
