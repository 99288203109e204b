"""The Ray backend: each run is a Ray task (1 CPU, one torch thread) on a Ray cluster.

``address=None`` connects to the cluster ``ray.init`` finds (``RAY_ADDRESS``, the cluster ``ray start`` last
started on this machine) or starts one on this machine. Workers must be able to import keel (install it on every
node); run stores are written where the task runs, so on a multi-node cluster put the sweep directory on a shared
filesystem. Needs ``pip install keel[ray]``.

Runs are handed to Ray only as fast as the cluster can start them (its CPUs, or ``num_cpus``), so "running" in the
sweep store means running, as with the local backend: every run submitted at once showed as running while it
waited in Ray's queue, and a killed sweep's resume counted an attempt for runs that had never started.

A run whose worker dies (killed, out of memory) is run once more by Ray, as the local backend re-runs one whose
worker died; only a run that kills its worker twice is recorded as an error.

References:
    Moritz et al. (2018), "Ray: A Distributed Framework for Emerging AI Applications", OSDI.
    https://docs.ray.io/en/latest/ray-core/tasks.html
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from keel.proxy.sweep.backends.base import Task, crashed
from keel.proxy.sweep.grid import RunSpec
from keel.proxy.sweep.worker import RunResult, run_one

# The addresses at which ray.init starts a Ray instance on this machine (when no cluster is found for None).
STARTS_HERE = (None, "local")
# Seconds to wait for a cluster's port to answer. Ray itself retried a dead address for ~14 minutes (20 tries of
# ~40 s each) before failing: a typo in --address, or a cluster that died without `ray stop`, hung the sweep.
CONNECT_TIMEOUT_S = 10.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # name="ray": the CLI's "an extra is missing" (exit 2) whatever Ray's own error was
        raise ImportError("the Ray sweep backend needs Ray: pip install 'keel[ray]'", name="ray") from exc
    return ray


class RayBackend:
    """Runs sweep tasks as Ray tasks.

    Args:
        address: A Ray cluster address (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``, ``"local"`` for a
            new instance on this machine); ``None``: whatever ``ray.init()`` finds or starts.
        num_cpus: The most runs in flight at once, and the CPUs of the Ray instance when this backend starts one
            (``None``: every CPU of the cluster).

    Raises:
        ImportError: Ray is not installed (checked here, before a sweep writes its store).
        ValueError: ``num_cpus`` < 1.

    Example:
        ``keel sweep --backend ray --address auto`` on a node of a running cluster.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        if num_cpus is not None and (not isinstance(num_cpus, int) or isinstance(num_cpus, bool) or num_cpus < 1):
            raise ValueError(f"num_cpus={num_cpus!r}; allowed: an int >= 1 or None (every CPU of the cluster)")
        _import_ray()
        self.address, self.num_cpus = address, num_cpus

    def check(self) -> None:
        """Raise now what connecting would (a cluster that does not answer, ``"auto"`` with no cluster): run_sweep
        calls it before it writes the sweep store, which a failed connection left behind with its grid."""
        ray = _import_ray()
        if not ray.is_initialized():
            self._cluster(ray)

    def _cluster(self, ray: Any) -> str | None:
        """The running cluster ``ray.init`` will join (checked to answer), or ``None`` where it starts one."""
        cluster = existing_cluster(ray, self.address)
        if cluster is not None:
            check_reachable(cluster, self.address)
        return cluster

    def run(self, tasks: list[Task], on_start: Callable[[RunSpec], None]) -> Iterator[RunResult]:
        ray = _import_ray()
        with self._session(ray):
            yield from self._dispatch(ray, tasks, on_start)

    @contextlib.contextmanager
    def _session(self, ray: Any) -> Iterator[None]:
        """Connected to Ray while the sweep runs: ``ray.init`` unless this process is connected already, and then
        Ray left as the sweep found it: shut down (a Ray instance it started outlived run_sweep in a notebook), and
        the environment variables ray.init set removed (``PYTHONBREAKPOINT=ray.util.rpdb._driver_set_trace`` sent
        every later ``breakpoint()`` to Ray's debugger; ``RAY_AUTH_MODE``, ...)."""
        if ray.is_initialized():
            yield
            return
        cluster = self._cluster(ray)
        options: dict[str, Any] = {"address": self.address, "include_dashboard": False, "log_to_driver": False}
        if cluster is None and self.address in STARTS_HERE and self.num_cpus is not None:
            # only for a new instance: Ray refuses num_cpus when it joins a cluster (`ray start` running here)
            options["num_cpus"] = self.num_cpus
        environ = set(os.environ)
        with sigterm_kept():
            ray.init(**options)
        try:
            yield
        finally:
            ray.shutdown()
            for name in set(os.environ) - environ:
                os.environ.pop(name, None)

    def _dispatch(self, ray: Any, tasks: list[Task], on_start: Callable[[RunSpec], None]) -> Iterator[RunResult]:
        # max_retries=1: Ray runs a task whose worker died once more (an application error is never retried, and
        # run_one returns its run's errors); the local backend re-runs such a run alone once too.
        remote = ray.remote(num_cpus=1, max_retries=1)(run_one)
        queue, pending = list(tasks), dict[Any, RunSpec]()
        try:
            while queue or pending:
                room = self.in_flight(ray) - len(pending)
                for spec, run_dir in queue[: max(room, 0)]:
                    on_start(spec)
                    try:
                        pending[remote.remote(spec, run_dir, threads=1)] = spec
                    except Exception as exc:  # not serializable (a hook closing over a lock): this run's error alone
                        yield crashed(spec, exc)
                del queue[: max(room, 0)]
                if not pending:
                    continue
                done, _ = ray.wait(list(pending), num_returns=1)
                spec = pending.pop(done[0])
                try:
                    yield ray.get(done[0])
                except Exception as exc:  # the task's worker died twice
                    yield crashed(spec, exc)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def in_flight(self, ray: Any) -> int:
        """Runs to have in Ray at once: ``num_cpus``, else the cluster's CPUs now (read again after each run, so
        a cluster that grows is used; on an autoscaling cluster whose head has no CPU, give ``num_cpus``)."""
        if self.num_cpus is not None:
            return self.num_cpus
        return max(1, int(ray.cluster_resources().get("CPU", 0)))


@contextlib.contextmanager
def sigterm_kept() -> Iterator[None]:
    """Keep this process's SIGTERM handling across ``ray.init``, which replaces it: after it, ``kill PID`` on a Ray
    sweep was a C++ stack dump and SIGABRT (exit -6) instead of keel sweep's "terminated (SIGTERM)" exit, which
    stops its runs and says that the same command resumes them."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def existing_cluster(ray: Any, address: str | None) -> str | None:
    """The ``host:port`` of the running cluster ``ray.init(address=address)`` joins, by Ray's own rules
    (``RAY_ADDRESS``, then Ray's record of the cluster ``ray start`` last started on this machine); ``None`` where
    it starts a Ray instance here, or where this Ray does not say (then nothing is checked).

    Raises:
        ValueError: An address Ray cannot parse. ConnectionError: ``"auto"`` and no cluster on this machine.
    """
    given = (os.environ.get("RAY_ADDRESS") or address) if address in (None, "auto") else address
    if given is not None and given.startswith("ray://"):  # Ray Client (ray.init reads RAY_ADDRESS the same way)
        return given.removeprefix("ray://")
    services = getattr(getattr(ray, "_private", None), "services", None)
    resolve = getattr(services, "canonicalize_bootstrap_address", None)
    return None if resolve is None else resolve(address)


def check_reachable(cluster: str, address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ConnectionError, naming where ``cluster`` came from, unless its port accepts a connection."""
    host, _, port = cluster.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        if address is not None:
            source = f"the address given ({address})"
        elif os.environ.get("RAY_ADDRESS"):
            source = "RAY_ADDRESS"
        else:
            source = "Ray's record of the cluster `ray start` last started on this machine, which outlived it"
        raise ConnectionError(
            f"no Ray cluster answers at {cluster}, from {source} ({type(exc).__name__}: {exc}); allowed: the address "
            "of a running cluster (`ray start --head` prints it), or --address local (address='local') to start a "
            "Ray instance on this machine; `ray stop` clears Ray's record of a cluster that is gone"
        ) from exc
