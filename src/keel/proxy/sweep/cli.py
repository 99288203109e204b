"""`keel sweep`: learning-rate-sensitivity sweeps of recipes on proxy models, locally or on Ray.

    keel sweep --quick                                   # reduced grid, minutes on a laptop CPU
    keel sweep --recipes baseline qk_norm_z_loss my_recipes.py:warmup_500 --sizes tiny small medium
    keel sweep --backend ray --address auto --out runs/sweep-big
    keel sweep --out runs/sweep --summarize --json       # summarise an existing (or live) sweep
    keel report runs/sweep                               # the sweep's tables and figures as an HTML page

Re-running the same command on the same ``--out`` resumes a killed sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from keel._core.argtypes import (
    ArgumentValueError,
    any_path,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
    show,
)
from keel._core.errors import KeelError
from keel.guard.console import progress_bar
from keel.proxy.model import list_proxy_sizes
from keel.proxy.sweep.backends import BACKENDS
from keel.proxy.sweep.grid import RUN_ID_KEYS, SweepConfig, quick_config, repeated
from keel.proxy.sweep.recipes import list_recipes, resolve_recipe
from keel.proxy.sweep.runner import RunEvent, SweepResult, load_sweep, run_sweep
from keel.proxy.sweep.summary import format_tables, to_json
from keel.store import sweep_store_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=None,
        type=any_path,
        help="sweep directory (default runs/sweep, runs/sweep-quick with --quick); an existing sweep there is resumed",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced grid: baseline vs qk_norm_z_loss, "
        "tiny and small, 4 LRs (1e-3 … 3e-1), 300 steps (minutes on a 2-core CPU)",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        type=_recipe,
        metavar="RECIPE",
        help=f"built-in ({', '.join(list_recipes())}), package.module:function or "
        "file.py:function returning a TrainConfig",
    )
    parser.add_argument("--lrs", nargs="+", type=positive_float, metavar="LR", help="peak LRs (default 3e-4 … 3e-1)")
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=list_proxy_sizes(),
        metavar="SIZE",
        help=f"proxy sizes ({', '.join(list_proxy_sizes())}; default tiny small medium)",
    )
    parser.add_argument("--seeds", nargs="+", type=nonnegative_int, metavar="SEED", help="seeds (default 0)")
    parser.add_argument("--steps", type=positive_int, help="optimizer steps per run (default 300)")
    parser.add_argument("--batch-size", type=positive_int, help="sequences per step (default 16)")
    parser.add_argument("--seq-len", type=positive_int, help="bytes per sequence (default 64)")
    parser.add_argument("--warmup", type=nonnegative_int, help="linear warm-up steps (default 20)")
    parser.add_argument(
        "--final-lr",
        type=nonnegative_float,
        help="LR at the end of the cosine decay, any peak LR (default 1e-5)",
    )
    parser.add_argument("--eval-batches", type=positive_int, help="validation batches per run (default 8)")
    parser.add_argument(
        "--max-grad-norm", type=nonnegative_float, help="gradient clipping norm; 0 disables (default 1)"
    )
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="where runs execute (default: local)")
    parser.add_argument(
        "--workers",
        type=positive_int,
        help="local worker processes (default: every available core); with --backend ray the most runs at once "
        "(default: the cluster's CPUs) and the CPUs of a Ray instance keel starts",
    )
    parser.add_argument(
        "--address",
        help="Ray cluster address (auto, HOST:6379, ray://HOST:10001, local: a new instance here); default: the "
        "cluster Ray finds on this machine, else a new instance",
    )
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        default=None,  # (None when not given: --summarize refuses a run option that was)
        help="resuming: run again the runs that raised (a worker that died, a recipe fixed since)",
    )
    parser.add_argument(
        "--scaling-lr",
        type=positive_float,
        help="fixed LR of the scaling view (default: the baseline's best LR at the smallest size)",
    )
    parser.add_argument(
        "--divergence-logit",
        type=positive_float,
        help="max attention logit counted as divergence "
        "in the scaling view (default: calibrated on the baseline's degraded runs)",
    )
    parser.add_argument(
        "--plots", default=None, type=output_dir, help="directory for the PNG figures (default OUT/plots)"
    )
    parser.add_argument(
        "--no-plots",
        action="store_true",
        help="write no PNG figures (keel report OUT draws them from the sweep store)",
    )
    parser.add_argument("--summarize", action="store_true", help="run nothing; summarise the sweep in --out")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (progress goes to stderr)")


# What only a run uses: with --summarize (which runs nothing) these would be silently ignored.
RUN_OPTIONS = (
    "recipes",
    "lrs",
    "sizes",
    "seeds",
    "steps",
    "batch_size",
    "seq_len",
    "warmup",
    "final_lr",
    "eval_batches",
    "max_grad_norm",
    "backend",
    "workers",
    "address",
    "retry_errors",
)


def _recipe(text: str) -> str:
    """argparse check: a recipe that resolves; a user's module is imported now, before anything runs."""
    try:
        resolve_recipe(text)
    except ValueError as exc:
        raise ArgumentValueError(str(exc)) from exc
    except (Exception, SystemExit) as exc:  # the user's module raised (or exited) while being imported
        raise ArgumentValueError(f"recipe {show(text)}: importing it raised {type(exc).__name__}: {exc}") from exc
    return text


def _recipe_name(recipe: str) -> str:
    return recipe.rpartition(":")[2]  # the name resolve_recipe gives a module:function or file.py:function


def _reject_repeats(args: argparse.Namespace) -> None:
    # Each grid point is one run id in the sweep store; a value given twice (or two LRs equal in the id's
    # %g form, 1e-3 and 0.0010000001) would name the same run twice.
    keys: dict[str, Callable[[Any], str]] = {"recipes": _recipe_name, **RUN_ID_KEYS}
    for name, key in keys.items():
        values = getattr(args, name)
        if values is not None and repeated(values, key) is not None:
            shown = " ".join(map(str, values))
            raise ValueError(f"--{name} {shown} names the same run twice; allowed: each value once")


def check_args(args: argparse.Namespace) -> None:
    """Refuse options that contradict each other, rather than silently ignoring one (ValueError)."""
    if args.summarize:
        given = [f"--{name.replace('_', '-')}" for name in RUN_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} has no effect with --summarize (it runs nothing); allowed: one or the other"
            )
    else:
        _reject_repeats(args)
        if args.address is not None and args.backend != "ray":
            raise ValueError(f"--address {args.address!r} needs --backend ray; allowed: --backend ray --address ADDR")
    if args.no_plots and args.plots is not None:
        raise ValueError("--plots and --no-plots contradict each other; allowed: one of them")


def sweep_config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The `SweepConfig` of the command line: ``--quick`` or the defaults, with each given option applied."""
    config = quick_config() if args.quick else SweepConfig()
    grid = {
        name: getattr(args, name)
        for name in ("recipes", "lrs", "sizes", "seeds", "final_lr")
        if getattr(args, name) is not None
    }
    run = {
        name: getattr(args, name)
        for name in ("steps", "batch_size", "seq_len", "warmup", "eval_batches")
        if getattr(args, name) is not None
    }
    if args.max_grad_norm is not None:
        run["max_grad_norm"] = args.max_grad_norm or None
    return dataclasses.replace(config, base=dataclasses.replace(config.base, **run), **grid)


def main(args: argparse.Namespace) -> int:
    check_args(args)
    out = Path(args.out or ("runs/sweep-quick" if args.quick else "runs/sweep"))
    if not args.summarize:
        try:
            output_dir(str(out))  # the store goes there: refused now, not after the first run
        except ArgumentValueError as exc:
            raise ArgumentValueError(f"argument --out: {exc}") from exc
    stream = sys.stderr if args.json else sys.stdout
    options = dict(scaling_lr=args.scaling_lr, divergence_logit=args.divergence_logit)
    backend = args.backend or "local"
    try:
        result = _summarize_or_run(args, out, backend, stream, options)
    except sqlite3.DatabaseError as exc:  # SQLite's message does not say which file (keel's StoreError does)
        if isinstance(exc, KeelError):
            raise
        raise ValueError(f"{sweep_store_path(out)}: {exc}") from exc
    if args.json:
        print(json.dumps(to_json(result.curves, result.scaling, result.rows), indent=2))
    else:
        print("\n" + format_tables(result.curves, result.scaling))
        print(f"\nsweep store: {sweep_store_path(out)}")
    if not args.no_plots and result.curves:  # after the tables: a folder it cannot write loses only the PNGs
        _write_plots(result, Path(args.plots) if args.plots else out / "plots", out, stream)
    return 0


def _summarize_or_run(
    args: argparse.Namespace, out: Path, backend: str, stream: TextIO, options: dict[str, float | None]
) -> SweepResult:
    if args.summarize:
        result = load_sweep(out, **options)
    else:
        config = sweep_config_from_args(args)
        print(
            f"keel sweep: {len(config.recipes)} recipes × {len(config.lrs)} LRs × {len(config.sizes)} sizes "
            f"× {len(config.seeds)} seeds, {config.base.steps} steps each, backend {backend} → {out}",
            file=stream,
            flush=True,
        )
        with progress_bar(None, "keel sweep", unit="run") as bar, sigterm_as_exit():
            result = run_sweep(
                config,
                out,
                backend=backend,
                workers=args.workers,
                address=args.address,
                progress=_printer(stream, bar),
                retry_errors=bool(args.retry_errors),
                **options,
            )
        if result.skipped:
            errors = sum(r["status"] == "error" and r["run_id"] in result.skipped for r in result.rows)
            again = f" ({errors} of them raised: --retry-errors runs them again)" if errors else ""
            print(
                f"resumed: {len(result.skipped)} runs were already finished{again}, {len(result.ran)} ran now",
                file=stream,
            )
    return result


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (``kill PID``, a job scheduler's first signal) ends the sweep as Ctrl-C does: an exception, so its
    workers are stopped with it (SIGTERM's default action ended this process alone and left them running)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received = threading.Event()

    def exit_on_sigterm(signum: int, frame: object) -> None:
        # said, as Ctrl-C's "interrupted" is: a job's log ended with the header line and nothing after it
        print("keel sweep: terminated (SIGTERM); the same command resumes it", file=sys.stderr, flush=True)
        received.set()
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    except SystemExit:
        if received.is_set():  # raised inside ray.wait, the exit comes out as Ray's SystemExit(1)
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _printer(stream: TextIO, bar: Any) -> Callable[[RunEvent], None]:
    """Each finished run: one result line (printed above the progress bar), and the bar one run further."""

    def show(event: RunEvent) -> None:
        r = event.result
        logit = "" if math.isnan(r.max_attn_logit) else f"  max logit {r.max_attn_logit:.3g}"
        detail = f"val {r.val_loss:.3f}{logit}" if r.status != "error" else (r.error or "").splitlines()[0]
        bar.write(
            f"[{event.done:>{len(str(event.total))}}/{event.total}] {event.spec.run_id:<40} {r.status:<8} "
            f"{detail}  ({r.wall_s:.0f}s)",
            file=stream,
        )
        bar.total = event.total
        bar.update()

    return show


def _write_plots(result: SweepResult, where: Path, out: Path, stream) -> None:  # type: ignore[no-untyped-def]
    try:
        from keel.proxy.sweep.plots import write_plots

        paths = write_plots(result.curves, result.scaling, where)
    except ImportError as exc:
        print(f"plots skipped: {exc}", file=stream)
        return
    except OSError as exc:  # a read-only sweep folder (--summarize of a finished sweep), a full disk
        print(f"plots not written ({exc}); the tables are above, and keel report {out} draws them", file=stream)
        return
    print(f"plots: {', '.join(str(p) for p in paths)} (keel report {out} draws them from the store)", file=stream)
