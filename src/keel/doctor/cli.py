"""`keel doctor PATH`: diagnose a training log you already have with the detectors the Guard runs live.

Exit status: 0 when nothing reaches ``--fail-on`` (or it is not given), 1 when a finding does, 2 when the
log cannot be read (one ``keel doctor: error: …`` line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

from keel._core.printable import printable
from keel.doctor.diagnose import diagnose_log
from keel.doctor.formats import FORMATS
from keel.doctor.log import LogReadError
from keel.doctor.text import format_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH",
                        help="CSV/TSV, JSONL, trainer_state.json, TensorBoard event file or folder, "
                             "keel run store")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--fail-on", choices=("warning", "critical"), default=None,
                        help="exit 1 when a finding of this severity or worse is found (for CI)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="force a reader instead of detecting it")
    parser.add_argument("--all", action="store_true", help="list info findings in the table too")


def main(args: argparse.Namespace) -> int:
    try:
        result = diagnose_log(args.path, format=args.format)
    except LogReadError as exc:
        print(f"keel doctor: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except (ValueError, OverflowError, RecursionError, MemoryError, UnicodeError) as exc:
        # Garbage that slipped past a reader's checks: still one line, still exit 2.
        print(printable(f"keel doctor: error: {args.path}: could not be read as a training log "
                        f"({type(exc).__name__}: {exc})"), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        print(format_result(result, min_severity="info" if args.all else "warning"))
    if args.fail_on is not None and result.at_least(args.fail_on):
        return 1
    return 0
