"""`keel doctor PATH`: examine a training log you already have with the detectors the Guard runs live.

A folder of keel runs (``runs/``, holding ``runs/A/keel``, ``runs/B/keel`` …, one or two levels down) is
examined run by run: a first line names the runs found, then each run's result (``--json``: one document
``{"source", "runs": [...], "errors": [...]}``). A run that cannot be read is its own error line; the others
are still examined.

Exit status: 0 when nothing reaches ``--fail-on`` (or it is not given), 1 when a finding does, 2 when a
log cannot be read (one ``keel doctor: error: …`` line on stderr per log, never a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from keel._core.printable import printable
from keel._core.progress import print_above_progress, step_progress
from keel.doctor._text import reading_reported
from keel.doctor.examine import examine
from keel.doctor.formats import FORMATS, find_logs, logs_left_out, read_log
from keel.doctor.log import LogReadError
from keel.doctor.result import DoctorResult
from keel.doctor.text import format_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        metavar="PATH",
        help="CSV/TSV, JSONL, trainer_state.json, TensorBoard event file or folder, W&B run (.wandb or its "
        "folder), MLflow run (mlruns folder or mlflow.db), keel run store, or a folder of runs (each is examined)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--fail-on",
        choices=("warning", "critical"),
        default=None,
        help="exit 1 when a finding of this severity or worse is found (for CI)",
    )
    parser.add_argument("--format", choices=FORMATS, default=None, help="force a reader instead of detecting it")
    parser.add_argument("--all", action="store_true", help="list info findings in the table too")
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bar (shown on stderr over a folder's runs, or over the bytes of one log of 8 MB or more, "
        "only when stderr is a terminal)",
    )


def main(args: argparse.Namespace) -> int:
    paths = find_logs(args.path, args.format) if args.path.strip() else [args.path]
    if args.format in (None, "keel_store") and args.path.strip() and (left := logs_left_out(args.path, "keel doctor")):
        print(f"keel doctor: note: {left}", file=sys.stderr)
    several = len(paths) > 1
    if several and not args.json:
        names = ", ".join(printable(p.relative_to(args.path).as_posix()) for p in paths)
        print(f"keel doctor: {printable(args.path)}: {len(paths)} runs in it: {names}")
    results: list[DoctorResult] = []
    errors: list[str] = []
    with step_progress((0, len(paths)), "keel doctor", enabled=several and not args.quiet, unit="run") as reached:
        for done, path in enumerate(paths, 1):
            error = _examine(path, args.format, results, progress=not several and not args.quiet)
            if error is not None:
                print_above_progress(f"keel doctor: error: {error}", file=sys.stderr)
                errors.append(error)
            elif not args.json:
                text = format_result(results[-1], min_severity="info" if args.all else "warning")
                print_above_progress(f"\n{text}" if several else text)
            reached(done)
    if args.json and (results or several):
        doc = (
            {"source": args.path, "runs": [r.to_dict() for r in results], "errors": errors}
            if several
            else results[0].to_dict()
        )
        print(json.dumps(doc, indent=2, allow_nan=False))
    if errors:
        return 2
    if args.fail_on is not None and any(r.at_least(args.fail_on) for r in results):
        return 1
    return 0


BIG_LOG_BYTES = 8_000_000  # one log this big shows a bar over its bytes while it is read (about a second or more)


def _examine(
    path: str | Path, format: str | None, results: list[DoctorResult], *, progress: bool = False
) -> str | None:
    """Examine one log into ``results`` (with ``progress``, a bar over a big file's bytes while it is read); the
    one-line error when it cannot be read."""
    size = _file_size(path) if progress else 0
    desc, big = f"keel doctor {printable(Path(path).name)}", size >= BIG_LOG_BYTES
    try:
        with step_progress((0, size), desc, enabled=big, unit="B") as reached, reading_reported(reached):
            log = read_log(path, format)
        with _bar_over_observations(f"{desc}: detectors", enabled=big) as examined:
            results.append(examine(log, progress=examined))
    except LogReadError as exc:
        return printable(str(exc))
    except (ValueError, OverflowError, RecursionError, MemoryError, UnicodeError) as exc:
        # Garbage that slipped past a reader's checks: still one line, still exit 2.
        return printable(f"{path}: could not be read as a training log ({type(exc).__name__}: {exc})")
    return None


@contextlib.contextmanager
def _bar_over_observations(desc: str, *, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """`examine`'s ``progress(done, total)``, drawn as a bar over the observations once the total is known: after a
    big log's bytes are read, its detectors' pass shows as well (it was a bar standing at 100 %)."""
    with contextlib.ExitStack() as stack:
        reached: Callable[[int], None] | None = None

        def examined(done: int, total: int) -> None:
            nonlocal reached
            if reached is None:
                reached = stack.enter_context(step_progress((0, total), desc, enabled=enabled))
            reached(done)

        yield examined


def _file_size(path: str | Path) -> int:
    """The size of a regular file; 0 for a folder or anything that cannot be looked at (its reader says why)."""
    try:
        status = Path(path).stat()
    except (OSError, ValueError):
        return 0
    return status.st_size if stat.S_ISREG(status.st_mode) else 0
