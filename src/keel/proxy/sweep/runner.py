"""`run_sweep`: run a recipe × LR × size × seed grid of proxy runs into one sweep store, resumably.

Each run trains under ``Guard(policy="observe")`` (training bit-identical to the bare loop) into its own run
store under ``sweep_dir/runs/``; the sweep store ``sweep_dir/sweep.sqlite`` keeps a row per run. Calling
`run_sweep` again on the same directory resumes: finished runs (done, diverged, error) are kept and only the
pending ones, and those that were running when the sweep was killed, run again.

References:
    Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities",
    arXiv 2309.14322 (no official code).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from keel.guard.environment import describe_environment
from keel.guard.run_dir import lock_folder, unlock
from keel.proxy.sweep.backends import Backend, create_backend
from keel.proxy.sweep.grid import RunSpec, SweepConfig, expand_grid
from keel.proxy.sweep.scaling import ScalingView
from keel.proxy.sweep.store import SweepStore
from keel.proxy.sweep.summary import CurveSummary, scaling_views, summarize, to_json
from keel.proxy.sweep.worker import RunResult
from keel.store.sweep_schema import SUMMARY_KEY

SWEEP_LOCK = ".keel-sweep.lock"  # in the sweep folder while a sweep runs there


@dataclass(frozen=True)
class RunEvent:
    """One finished run, as the progress callback sees it.

    Attributes:
        done: Runs finished in this call so far, this one included.
        total: Runs this call has to run.
        spec: The run.
        result: Its result.
    """

    done: int
    total: int
    spec: RunSpec
    result: RunResult


@dataclass
class SweepResult:
    """The outcome of `run_sweep`.

    Attributes:
        sweep_dir: The sweep's directory (its store is ``sweep_dir/sweep.sqlite``).
        ran: Run ids executed by this call.
        skipped: Run ids already finished before this call (a resumed sweep).
        curves: One `CurveSummary` per (recipe, size) over the whole store.
        scaling: One `ScalingView` per recipe.
        rows: Every sweep-store row.
    """

    sweep_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    curves: list[CurveSummary] = field(default_factory=list)
    scaling: list[ScalingView] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_sweep(
    config: SweepConfig,
    sweep_dir: str | Path,
    *,
    backend: str | Backend = "local",
    workers: int | None = None,
    address: str | None = None,
    progress: Callable[[RunEvent], None] | None = None,
    scaling_lr: float | None = None,
    divergence_logit: float | None = None,
    retry_errors: bool = False,
) -> SweepResult:
    """Run (or resume) a sweep and summarise it.

    Args:
        config: The grid and the training settings its runs share (``config.base``).
        sweep_dir: The sweep's directory; an existing sweep there is resumed.
        backend: ``"local"`` (process pool), ``"ray"`` or a `Backend` object.
        workers: Local worker processes (default: every available core); for Ray, the most runs at once (default:
            the cluster's CPUs) and the CPUs of a Ray instance it starts.
        address: Ray cluster address (``--backend ray`` only).
        progress: Called with a `RunEvent` after each run finishes.
        scaling_lr: The fixed LR of the scaling view (default: the baseline's best LR at the smallest size).
        divergence_logit: The max attention logit taken as divergence in the scaling view (default:
            calibrated on the sweep's baseline runs).
        retry_errors: Run again the runs of a resumed sweep that raised (they count as finished otherwise).

    Returns:
        `SweepResult`.

    Raises:
        ValueError: A bad backend or recipe name, or a resumed sweep asked to run the same grid point with
            other settings.

    Example:
        >>> from keel.proxy.trainer import TrainConfig
        >>> base = TrainConfig(steps=2, eval_batches=1, max_grad_norm=1.0)
        >>> cfg = SweepConfig(recipes=["baseline"], lrs=[1e-2], sizes=["tiny"], base=base)
        >>> import tempfile
        >>> run_sweep(cfg, tempfile.mkdtemp(), workers=1).rows[0]["status"]
        'done'
    """
    sweep_dir = Path(sweep_dir)
    engine = create_backend(backend, workers=workers, address=address) if isinstance(backend, str) else backend
    check = getattr(engine, "check", None)
    if callable(check):  # a backend that cannot run (a Ray cluster that does not answer) says so before the store
        check()
    specs = expand_grid(config)
    result = SweepResult(sweep_dir=sweep_dir)
    with sweep_lock(sweep_dir), SweepStore(sweep_dir) as store:
        stored = store.meta().get("sweep")
        # a resume, or more grid points for the sweep the folder holds: its grid grows once its runs are accepted
        grid = config.describe() if stored is None else joined_grid(stored, config.describe(), sweep_dir)
        # Stored relative to the sweep directory, so a sweep can be moved or copied off a cluster whole.
        store.add_runs(specs, lambda run_id: run_dir_for(Path(), run_id))
        first = {"created": time.time(), **describe_environment()} if stored is None else {}
        store.set_meta({"sweep": grid, **first})
        todo = set(store.unfinished([s.run_id for s in specs], errors=retry_errors))
        result.skipped = [s.run_id for s in specs if s.run_id not in todo]
        tasks = [(s, str(run_dir_for(sweep_dir.resolve(), s.run_id))) for s in specs if s.run_id in todo]
        for n, outcome in enumerate(engine.run(tasks, lambda s: store.mark_running(s.run_id)), start=1):
            store.record(outcome)
            result.ran.append(outcome.run_id)
            if progress is not None:
                spec = next(s for s, _ in tasks if s.run_id == outcome.run_id)
                progress(RunEvent(done=n, total=len(tasks), spec=spec, result=outcome))
        result.rows = store.rows()
        result.curves = summarize(result.rows)
        result.scaling = scaling_views(result.rows, result.curves, lr=scaling_lr, divergence_logit=divergence_logit)
        store_summary(store, result)
    return result


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``sweep_dir`` for one sweep: a second ``keel sweep`` on it (the same command run twice, a resume while the
    first still runs) is refused; both ran every run, deleted each other's live run folders and recorded end signals
    read from the other's half-written stores."""
    locks: list[IO[str]] = []
    problem = lock_folder(
        sweep_dir,
        locks,
        in_use=f"sweep folder {str(sweep_dir)!r} is in use by another keel sweep",
        allowed="wait for it to end (a resume then runs what is left), or another --out",
        name=SWEEP_LOCK,
    )
    if problem is not None:
        raise ValueError(problem)
    try:
        yield
    finally:
        unlock(locks)


GRID_LISTS = ("recipes", "lrs", "sizes", "seeds")  # what may grow; the runs' shared settings may not


def joined_grid(stored: dict[str, Any], asked: dict[str, Any], sweep_dir: Path) -> dict[str, Any]:
    """The grid of the sweep in ``sweep_dir`` once ``asked`` (a `SweepConfig.describe`) adds its points to the stored
    one: each list joined (LRs and seeds in increasing order, recipes and sizes as first seen).

    Raises:
        ValueError: ``asked`` trains its runs with other shared settings (``--steps``, ``--batch-size``,
            ``--final-lr`` …) than the stored sweep: its runs were added to the folder's table and compared with
            runs trained otherwise, as one sweep (a 5-step recipe "10x more LR-sensitive" than a 60-step baseline).
    """
    asked = json.loads(json.dumps(asked, default=str))  # as the store holds it: tuples as lists
    stored_base, asked_base = dict(stored.get("base") or {}), dict(asked.get("base") or {})
    stored_base["final_lr"], asked_base["final_lr"] = stored.get("final_lr"), asked.get("final_lr")
    differ = sorted(k for k in stored_base.keys() | asked_base.keys() if stored_base.get(k) != asked_base.get(k))
    if differ:
        there = ", ".join(f"{k}={stored_base.get(k)!r}" for k in differ)
        here = ", ".join(f"{k}={asked_base.get(k)!r}" for k in differ)
        raise ValueError(
            f"sweep folder {str(sweep_dir)!r} holds a sweep whose runs train with {there}, and this sweep asks for "
            f"{here}: its runs would be compared with those as one sweep; allowed: the same run settings (to "
            "resume it, or to add recipes, LRs, sizes or seeds), or another --out"
        )
    joined = dict(stored)
    for name in GRID_LISTS:
        values = list(dict.fromkeys([*stored.get(name, []), *asked.get(name, [])]))
        joined[name] = sorted(values) if name in ("lrs", "seeds") else values  # numbers in order, names as first seen
    return joined


def store_summary(store: SweepStore, result: SweepResult) -> None:
    """Keep ``result``'s summary (the ``keel sweep --json`` document) in the sweep store, where `keel report`
    reads it: the report may not import this package, so it shows what the sweep computed."""
    store.set_meta({SUMMARY_KEY: to_json(result.curves, result.scaling, result.rows)})


def load_sweep(
    sweep_dir: str | Path, *, scaling_lr: float | None = None, divergence_logit: float | None = None
) -> SweepResult:
    """Summarise an existing sweep store without running anything (a live sweep included)."""
    with SweepStore(sweep_dir, readonly=True) as store:
        rows = store.rows()
    curves = summarize(rows)
    return SweepResult(
        sweep_dir=Path(sweep_dir),
        curves=curves,
        rows=rows,
        scaling=scaling_views(rows, curves, lr=scaling_lr, divergence_logit=divergence_logit),
    )


def run_dir_for(sweep_dir: Path, run_id: str) -> Path:
    """``sweep_dir/runs/<recipe>/<size>/lr=<lr>/seed=<seed>``, characters outside [A-Za-z0-9._=-] as ``_``."""
    return sweep_dir / "runs" / Path(*(re.sub(r"[^A-Za-z0-9._=+-]", "_", part) for part in run_id.split("/")))
