"""The Ray backend: each run is a Ray task (1 CPU, one torch thread) on a Ray cluster.

``address=None`` connects to the cluster ``ray.init`` finds (``RAY_ADDRESS``, a running local head) or
starts one on this machine. Workers must be able to import keel (install it on every node); run stores
are written where the task runs, so on a multi-node cluster put the sweep directory on a shared
filesystem. Needs ``pip install keel[ray]``.

References:
    Moritz et al. (2018), "Ray: A Distributed Framework for Emerging AI Applications", OSDI.
    https://docs.ray.io/en/latest/ray-core/tasks.html
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from keel.proxy.sweep.backends.base import Task, crashed
from keel.proxy.sweep.grid import RunSpec
from keel.proxy.sweep.worker import RunResult, run_one


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the Ray sweep backend needs Ray: pip install 'keel[ray]'") from exc
    return ray


class RayBackend:
    """Runs sweep tasks as Ray tasks.

    Args:
        address: A Ray cluster address (``"auto"``, ``"ray://host:10001"``); ``None``: whatever
            ``ray.init()`` finds or starts.
        num_cpus: CPUs of the local Ray instance when this backend starts one (``None``: all).

    Example:
        ``keel sweep --backend ray --address auto`` on a node of a running cluster.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address, self.num_cpus = address, num_cpus

    def run(self, tasks: list[Task], on_start: Callable[[RunSpec], None]) -> Iterator[RunResult]:
        ray = _import_ray()
        if not ray.is_initialized():
            options: dict[str, Any] = {
                "address": self.address,
                "include_dashboard": False,
                "log_to_driver": False,
            }
            if self.address is None and self.num_cpus is not None:
                options["num_cpus"] = self.num_cpus
            ray.init(**options)
        remote = ray.remote(num_cpus=1, max_retries=0)(run_one)
        pending: dict[Any, RunSpec] = {}
        for spec, run_dir in tasks:
            on_start(spec)
            pending[remote.remote(spec, run_dir, threads=1)] = spec
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                spec = pending.pop(done[0])
                try:
                    yield ray.get(done[0])
                except Exception as exc:  # the task's worker died
                    yield crashed(spec, exc)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
