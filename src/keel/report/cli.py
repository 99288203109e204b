"""`keel report RUN... [-o report.html]`: one self-contained HTML stability report from run stores."""

from __future__ import annotations

import argparse
import sys

from keel.report.page import ReportError, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders or run.sqlite files; a folder of runs (runs/demo) stands for "
                             "all of them")
    parser.add_argument("-o", "--out", default="report.html",
                        help="the HTML file to write (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    try:
        path = write_report(args.runs, args.out)
    except (ReportError, FileNotFoundError) as exc:
        print(f"keel report: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
