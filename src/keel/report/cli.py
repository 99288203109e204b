"""`keel report RUN... [-o report.html]`: one self-contained HTML stability report from run stores, and from
training logs `keel doctor` reads (drawn with its findings)."""

from __future__ import annotations

import argparse
import sys

from keel._core.argtypes import any_path, output_file
from keel.report.page import write_report
from keel.report.sources import logs_left_out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        type=any_path,
        help="run folders or run.sqlite files; a folder of runs (runs/demo) stands for all of them; any log "
        "keel doctor reads (CSV, JSONL, TensorBoard, trainer_state.json, Megatron, fairseq ...) is drawn as a run",
    )
    parser.add_argument(
        "-o", "--out", default="report.html", type=output_file, help="the HTML file to write (default: %(default)s)"
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bar (shown on stderr while the runs are read, only when stderr is a terminal)",
    )


def main(args: argparse.Namespace) -> int:
    # A ReportError (no run store among RUN...) is answered by keel.cli: one line, exit status 2.
    for note in logs_left_out(args.runs):  # on the page too; here for a report written without a look at it
        print(f"keel report: note: {note}", file=sys.stderr)
    print(write_report(args.runs, args.out, progress=not args.quiet))
    return 0
