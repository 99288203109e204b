"""`keel export RUN --format csv|jsonl|tensorboard|wandb|mlflow`: write a run store out for other tools."""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

from keel._core.argtypes import existing_path, output_dir
from keel.store import RunReader
from keel.store.exporters import EXPORTERS, export_run, list_exporters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=existing_path, metavar="RUN", help="run directory (or its run.sqlite)")
    parser.add_argument(
        "--format",
        "-f",
        dest="fmt",
        required=True,
        choices=list_exporters(),
        help="; ".join(f"{k}: {v}" for k, v in EXPORTERS.items()),
    )
    parser.add_argument(
        "--out", "-o", default=None, type=output_dir, help="output directory (default: RUN/export/FORMAT)"
    )
    parser.add_argument(
        "--keys",
        default=None,
        help="comma-separated glob patterns of the signals to export, e.g. 'loss,grad/norm*' (default: all)",
    )
    parser.add_argument("--project", default=None, help="W&B project (wandb; default: keel)")
    parser.add_argument(
        "--online", action="store_true", default=None, help="upload to W&B instead of writing an offline run"
    )
    parser.add_argument("--experiment", default=None, help="MLflow experiment (mlflow; default: keel)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db; 'file:DIR' for a file store)",
    )
    parser.add_argument("--json", action="store_true", help="print the written paths as JSON")
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bar (shown on stderr while the run's steps are written, only when stderr is a terminal)",
    )


# The options only one format reads: given with another format they would be silently ignored.
FORMAT_OPTIONS = {"wandb": ("project", "online"), "mlflow": ("experiment", "tracking_uri")}


def main(args: argparse.Namespace) -> int:
    for fmt, names in FORMAT_OPTIONS.items():
        given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]
        if given and args.fmt != fmt:
            raise ValueError(f"{', '.join(given)} has no effect with --format {args.fmt}; allowed: with --format {fmt}")
    options: dict = {}
    if args.fmt == "wandb":
        options = {"project": args.project or "keel", "mode": "online" if args.online else "offline"}
    elif args.fmt == "mlflow":
        options = {"experiment": args.experiment or "keel", "tracking_uri": args.tracking_uri}
    keys = _patterns(args.run, args.keys) if args.keys is not None else None
    paths = export_run(args.run, args.fmt, args.out, keys=keys, progress=not args.quiet, **options)
    if args.json:
        print(json.dumps([str(p) for p in paths]))
    else:
        for path in paths:
            print(path)
    return 0


def _patterns(run: Path, text: str) -> list[str]:
    """The ``--keys`` patterns; one that selects no signal is refused rather than exporting an empty table."""
    patterns = [k.strip() for k in text.split(",") if k.strip()]
    if not patterns:
        raise ValueError(f"--keys {text!r} has no pattern; allowed: comma-separated globs such as 'loss,grad/norm*'")
    with RunReader(run) as reader:
        available = reader.signal_keys()
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in available)]  # RunTable's rule
    if unmatched:
        shown = ", ".join(available[:8]) + (" …" if len(available) > 8 else "")
        raise ValueError(
            f"--keys {', '.join(map(repr, unmatched))} matches no signal of {run}; allowed: globs over "
            f"its signals ({shown or 'none'})"
        )
    return patterns
