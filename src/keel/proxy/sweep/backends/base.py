"""The backend protocol shared by the local and Ray backends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from keel.proxy.sweep.grid import RunSpec
from keel.proxy.sweep.worker import RunResult

# One unit of work: the run and the directory of its own run store.
Task = tuple[RunSpec, str]


class Backend(Protocol):
    """Runs sweep tasks and yields their results as they finish.

    A backend may also have ``check() -> None``, which raises what would stop it from running (the Ray backend: a
    cluster that does not answer); `run_sweep` calls it before it writes the sweep store.
    """

    name: str

    def run(self, tasks: list[Task], on_start: Callable[[RunSpec], None]) -> Iterator[RunResult]:
        """Run every task (``on_start(spec)`` when it is dispatched); yield each `RunResult` when done."""
        ...


def crashed(spec: RunSpec, exc: BaseException) -> RunResult:
    """The result of a run whose worker died (the run itself never raises)."""
    return RunResult(run_id=spec.run_id, status="error", error=f"worker failed: {type(exc).__name__}: {exc}")
