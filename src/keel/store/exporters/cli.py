"""`keel export RUN --format csv|jsonl|tensorboard|wandb|mlflow`: write a run store out for other tools."""

from __future__ import annotations

import argparse
import json

from keel.store.exporters import EXPORTERS, export_run, list_exporters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (or its run.sqlite)")
    parser.add_argument("--format", "-f", dest="fmt", required=True, choices=list_exporters(),
                        help="; ".join(f"{k}: {v}" for k, v in EXPORTERS.items()))
    parser.add_argument("--out", "-o", default=None, help="output directory (default: RUN/export/FORMAT)")
    parser.add_argument("--keys", default=None,
                        help="comma-separated glob patterns of the signals to export, e.g. 'loss,grad/norm*' "
                             "(default: all)")
    parser.add_argument("--project", default="keel", help="W&B project (wandb)")
    parser.add_argument("--online", action="store_true", help="upload to W&B instead of writing an offline run")
    parser.add_argument("--experiment", default="keel", help="MLflow experiment (mlflow)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db; 'file:DIR' for a file store)")
    parser.add_argument("--json", action="store_true", help="print the written paths as JSON")


def main(args: argparse.Namespace) -> int:
    options: dict = {}
    if args.fmt == "wandb":
        options = {"project": args.project, "mode": "online" if args.online else "offline"}
    elif args.fmt == "mlflow":
        options = {"experiment": args.experiment, "tracking_uri": args.tracking_uri}
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    paths = export_run(args.run, args.fmt, args.out, keys=keys, **options)
    if args.json:
        print(json.dumps([str(p) for p in paths]))
    else:
        for path in paths:
            print(path)
    return 0
