"""Where sweep runs execute: a local process pool (default) or a Ray cluster.

A backend is any object with ``name`` and ``run(tasks, on_start) -> Iterator[RunResult]`` (the `Backend`
protocol): it runs `keel.proxy.sweep.worker.run_one` on each (spec, run_dir) task and yields each result
as soon as its run finishes, in any order.
"""

from __future__ import annotations

from keel.proxy.sweep.backends.base import Backend, Task
from keel.proxy.sweep.backends.local import LocalBackend
from keel.proxy.sweep.backends.ray import RayBackend

BACKENDS = ("local", "ray")


def create_backend(name: str, *, workers: int | None = None, address: str | None = None) -> Backend:
    """Build a backend by name: ``"local"`` (``workers`` processes) or ``"ray"`` (``address`` of a cluster,
    ``None`` for one started on this machine).

    Raises:
        ValueError: An unknown name.
    """
    if name == "local":
        return LocalBackend(workers=workers)
    if name == "ray":
        return RayBackend(address=address, num_cpus=workers)
    raise ValueError(f"unknown sweep backend {name!r}; allowed: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "LocalBackend", "RayBackend", "Task", "create_backend"]
