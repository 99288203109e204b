"""The local backend: a pool of worker processes on this machine, one torch thread each.

One thread per run, always: a run's numbers then do not depend on how many workers ran beside it (a
different thread count changes the order of floating-point reductions), so a sweep gives bit-identical
results whatever ``workers`` is, and the same as the Ray backend.

Workers are started with ``spawn`` (a fresh interpreter: forking a process that already runs torch's
thread pools can deadlock). ``workers=1`` runs in this process, which skips the few seconds each spawned
worker spends importing torch and reading the corpus.

A worker that dies (killed, out of memory, a segfault in a kernel) breaks a ``ProcessPoolExecutor``: every
run in flight fails with it and no new run can be submitted. The backend then starts a fresh pool for the
rest of the grid and re-runs each run that was in flight alone, in a pool of its own, so only the run that
kills its worker again is recorded as an error and the sweep goes on.

When the sweep itself stops (Ctrl-C, a SIGTERM the CLI turns into an exit, an exception), its runs in flight are
killed and the queued ones dropped at once: they are re-run on resume, and a pool left to finish them would keep
the CLI hung for a run's length per worker. A worker whose parent is gone (killed with SIGKILL) ends itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from keel._core.errors import KeelWarning
from keel.proxy.sweep.backends.base import Task, crashed
from keel.proxy.sweep.grid import RunSpec
from keel.proxy.sweep.recipes import RECIPE_FILES, load_recipe_file
from keel.proxy.sweep.worker import RunResult, run_one


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class LocalBackend:
    """Runs sweep tasks in a local process pool.

    Args:
        workers: Worker processes; ``None`` uses every available core.
        threads_per_run: ``torch.set_num_threads`` in each run (1 keeps results independent of ``workers``).

    Raises:
        ValueError: ``workers`` < 1.

    Warns:
        KeelWarning: ``workers`` above the cores this process may use (the runs then share them: each is slower,
            its numbers the same).
    """

    name = "local"

    def __init__(self, workers: int | None = None, threads_per_run: int = 1) -> None:
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers={workers!r}; allowed: an int >= 1 or None (every core)")
        if not isinstance(threads_per_run, int) or threads_per_run < 1:
            raise ValueError(f"threads_per_run={threads_per_run!r}; allowed: an int >= 1")
        cores = available_cores()
        if workers is not None and workers > cores:
            warnings.warn(
                f"workers={workers} is more than the {cores} cores this process may use: the runs share them, each "
                "slower (their numbers are the same: one thread per run); allowed without this note: up to "
                f"{cores}",
                KeelWarning,
                stacklevel=2,
            )
        self.workers = workers or cores
        self.threads = threads_per_run

    def run(self, tasks: list[Task], on_start: Callable[[RunSpec], None]) -> Iterator[RunResult]:
        if self.workers == 1 or len(tasks) <= 1:
            for spec, run_dir in tasks:
                on_start(spec)
                yield run_one(spec, run_dir, threads=self.threads)
            return
        queue = list(tasks)
        while queue:
            suspects = yield from self._pool(queue, on_start, self.workers)
            for task in suspects:  # alone in a fresh pool: a second death is this run's own
                if (yield from self._pool([task], on_start, 1)):
                    yield crashed(task[0], BrokenProcessPool("the worker died running this run, twice"))

    def _pool(
        self, queue: list[Task], on_start: Callable[[RunSpec], None], workers: int
    ) -> Generator[RunResult, None, list[Task]]:
        """Run ``queue`` (consumed) in one spawned pool; yield results; return the runs that were in flight
        when a worker died (the pool is then unusable, and the rest of ``queue`` is left for the next)."""
        context = multiprocessing.get_context("spawn")
        with (
            ProcessPoolExecutor(
                max_workers=min(workers, len(queue)),
                mp_context=context,
                initializer=start_worker,
                initargs=(os.getpid(), {name: path for name, (path, _) in RECIPE_FILES.items()}),
            ) as pool,
            recipe_files_importable(),
        ):
            pending: dict[Future[RunResult], Task] = {}
            try:
                # No more tasks handed to the pool than it has workers, so a run marked "running" in the store is
                # running (one queued per worker beyond them showed twice the runs running; a worker that ends a
                # run waits only for this loop to hand it the next: milliseconds, against a run's seconds)
                while queue or pending:
                    while queue and len(pending) < workers:
                        task = queue.pop(0)
                        on_start(task[0])
                        pending[pool.submit(run_one, *task, threads=self.threads)] = task
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    broken = []
                    for future in done:
                        task = pending.pop(future)
                        try:
                            result = future.result()
                        except BrokenProcessPool:
                            broken.append(task)
                            continue
                        except Exception as exc:  # the task could not be shipped (e.g. not picklable)
                            result = crashed(task[0], exc)
                        yield result
                    if broken:
                        # Every run in flight fails with the one that killed its worker; which one did is
                        # unknown, so each of them runs again alone.
                        return [*broken, *pending.values()]
            except BaseException:  # Ctrl-C, SystemExit, the caller closing this generator, an error above
                stop_workers(pool)
                raise
        return []


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """End ``pool`` now: its workers (and the runs in flight) terminated, the queued runs failed with them.

    Without this, leaving the pool waited for every run already handed to a worker, and the interpreter's exit
    waited again for a pool that was only shut down."""
    # no public handle before Python 3.14's terminate_workers(); read before shutdown(), which drops it
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    pool.shutdown(wait=False)  # not cancel_futures: the pool fails the futures of a broken pool itself


def start_worker(parent: int, recipe_files: dict[str, Path]) -> None:
    """A worker's initializer: end with the sweep (`exit_with_parent`), and load the recipe files the sweep loaded
    under their names, so that a TrainConfig hook defined in one unpickles here (a PicklingError in every run
    before)."""
    exit_with_parent(parent)
    for name, path in recipe_files.items():
        sys.modules[name] = load_recipe_file(name, path)


@contextlib.contextmanager
def recipe_files_importable() -> Iterator[None]:
    """The recipe files' modules in ``sys.modules`` while a pool runs: pickle ships their functions by name (the Ray
    backend's cloudpickle ships them by value, which needs them out of it)."""
    added = [name for name in RECIPE_FILES if name not in sys.modules]
    for name in added:
        sys.modules[name] = RECIPE_FILES[name][1]
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def exit_with_parent(parent: int, every: float = 1.0) -> None:
    """A worker's initializer: a daemon thread that ends this process once ``parent`` is no longer its parent
    (the sweep was killed with SIGKILL, or died), instead of waiting on the pool's queue for good."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="keel-sweep-parent", daemon=True).start()
