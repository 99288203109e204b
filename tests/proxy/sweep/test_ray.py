"""The Ray backend against the local ones (process pool and in-process), on a real Ray instance this test
starts on this machine. Slow: Ray's start-up and each spawned worker's torch import take most of a minute
on a loaded 2-core machine."""

import pytest

from keel.proxy.sweep import RayBackend, run_sweep
from tests.proxy.sweep.conftest import RESULT_KEYS as KEYS

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_backend_gives_the_local_backends_metrics(tmp_path, tiny_sweep):
    def broken(base):
        raise ValueError("recipe fails")

    config = tiny_sweep(recipes=["baseline", "qk_norm_z_loss", broken], lrs=[1e-2, 3e-2])
    local = run_sweep(config, tmp_path / "local", backend="local", workers=2)
    in_process = run_sweep(config, tmp_path / "in_process", backend="local", workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(config, tmp_path / "ray", backend=RayBackend())
    finally:
        ray.shutdown()
    assert sorted(remote.ran) == sorted(local.ran) and len(remote.ran) == 6
    by_id = {r["run_id"]: r for r in local.rows}
    for row in [*remote.rows, *in_process.rows]:  # bit-identical: one torch thread per run everywhere
        assert [row[k] for k in KEYS] == [by_id[row["run_id"]][k] for k in KEYS]
    assert by_id["baseline/tiny/lr=0.01/seed=0"]["val_loss"] != by_id["qk_norm_z_loss/tiny/lr=0.01/seed=0"]["val_loss"]
    assert [c.sensitivity for c in remote.curves] == [c.sensitivity for c in local.curves]
    assert {r["status"] for r in remote.rows} == {"done", "error"}
