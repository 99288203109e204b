"""The `keel` command: a thin shell where each verb calls one public library function.

Each verb lives in its own module with ``add_arguments(parser)`` and ``main(args) -> int``; only the invoked
verb's module is imported, so ``keel --help`` stays fast and optional extras stay optional.

Errors: every verb answers with at most one line on stderr, never a traceback (``KEEL_DEBUG=1`` shows it).

- **Bad input, exit status 2**, ``keel VERB: error: MESSAGE``. First, the arguments: each verb checks its
  values with argparse types (`keel._core.argtypes`: ranges, paths that must exist, output paths that must be
  writable, devices that must be present, importable recipes), so a bad value is refused before any work
  starts. Then what the work finds wrong with what the user gave it:

  - `KeelError` (keel's own errors are raised for conditions it checked: a log or store it cannot read, a
    report with no run), except `TrainingAborted`: an outcome, answered ``keel VERB: aborted: …``, exit 1;
  - `ValueError`: keel's configs and readers raise it naming the bad value and what is allowed (STYLE.md),
    and the verbs pass it the user's values;
  - `OSError` and `sqlite3.DatabaseError`: a path the user named could not be read or written (missing, a
    folder, no permission, disk full), or a file named as a store is not one;
  - `ImportError` of a module outside keel: an optional extra the chosen option needs is not installed (the
    message names the ``pip install keel[extra]``).

- **A keel bug, exit status 1**, ``keel VERB: internal error: TYPE: MESSAGE (…KEEL_DEBUG=1…)``: any other
  exception (``TypeError``, ``KeyError``, ``RuntimeError`` …) means keel itself went wrong, not the input.
  Exit status 1 is also a verb's own "found something" answer (``keel doctor --fail-on``, a failing
  ``keel bench detect`` scenario).
- **Interrupted, exit status 130** (Ctrl-C), ``keel VERB: interrupted``.
- A `KeelWarning` (a store written by a newer keel, a run that could not be read whole) is one line,
  ``keel VERB: warning: MESSAGE``, not Python's two (keel's source file and line).
- ``keel`` with no verb prints the help and exits 2; ``--help`` exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys
import warnings
from collections.abc import Callable
from typing import Any

from keel._core.errors import KeelError, KeelWarning, TrainingAborted
from keel._core.printable import one_line

# verb → (module, one-line help). A verb with sub-verbs (bench) dispatches inside its module.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("keel.demo", "train an unstable proxy recipe bare, guarded, recovering and stabilized, side by side"),
    "bench": ("keel.harness.bench.cli", "measure keel's own cost against a baseline in the same process"),
    "doctor": ("keel.doctor.cli", "examine a training log: CSV, JSONL, TensorBoard, W&B, MLflow, HF, console logs"),
    "report": ("keel.report.cli", "write one self-contained HTML stability report from run stores and logs"),
    "export": ("keel.store.exporters.cli", "write a run store as CSV, JSON lines, TensorBoard, W&B or MLflow"),
    "list": ("keel.catalog", "the index: every signal, detector, stabilizer, optimizer, loss, integration by domain"),
    "sweep": ("keel.proxy.sweep.cli", "LR-sensitivity sweeps of recipes on proxy models, locally or on Ray"),
}
MAX_MESSAGE = 1000  # characters of one error line; a message quoting a huge value is cut, not wrapped


class UsageError(Exception):
    """A command line argparse refused; the message is the whole ``keel VERB: error: …`` line."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its error as one line (no usage block) raised to `main`, not ``sys.exit``.

    Sub-parsers (verbs, ``keel bench WHAT``) are made with the parent's class, so they answer the same way.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> object:
        # ``--seed=--``: argparse (3.11–3.12) drops the "--" and stores an empty list without calling the
        # option's type, so the work ran with seed=[]. An option that takes values gets at least one.
        if arg_strings == ["--"] and action.option_strings and action.nargs not in (0, "?", "*", "..."):
            raise UsageError(f"{self.prog}: error: argument {'/'.join(action.option_strings)}: '--' is not a value")
        return super()._get_values(action, arg_strings)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``verb``'s module is imported to add its arguments."""
    parser = _Parser(prog="keel", description="Keep neural-network training stable.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        verb_parser.set_defaults(_module=module_name)
        if name == verb:
            importlib.import_module(module_name).add_arguments(verb_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; return its exit status (see the module docstring for what 1, 2 and 130 mean)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    prog = f"keel {verb}" if verb in VERBS else "keel"
    replace_unencodable()
    try:
        parser = build_parser(verb)
        args, unknown = parser.parse_known_args(argv)
        if args.verb is not None:
            prog = " ".join(["keel", args.verb, *([args.bench] if getattr(args, "bench", None) else [])])
        if unknown:  # argparse would name the top-level parser ("keel: error:"); the verb's is more helpful
            raise UsageError(f"{prog}: error: unrecognized arguments: {' '.join(unknown)}")
        if args.verb is None:
            parser.print_help()
            return 2
        with warnings.catch_warnings():  # restores showwarning: main() also runs inside other programs and tests
            if not _debug():
                warnings.showwarning = _warning_line(prog, warnings.showwarning)
            return int(importlib.import_module(args._module).main(args) or 0)
    except UsageError as exc:
        _say(str(exc))
        return 2
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return 130
    except BrokenPipeError:  # `keel list | head`: the reader left; nothing to say, and nowhere to say it
        _silence_stdout()
        return 141
    except Exception as exc:
        if _debug():
            raise
        if is_bad_input(exc):
            _say(f"{prog}: error: {describe(exc)}")
            return 2
        if isinstance(exc, TrainingAborted):  # an outcome keel reached on purpose, not a bug
            _say(f"{prog}: aborted: {exc}")
            return 1
        _say(f"{prog}: internal error: {type(exc).__name__}: {exc} (a keel bug; KEEL_DEBUG=1 shows the traceback)")
        return 1


def replace_unencodable() -> None:
    """Let stdout and stderr print what their encoding cannot (keel's ×, →, … on an ASCII or latin-1 locale, a
    Windows cp1252 console or file) as ``?``: the tables and summaries raised UnicodeEncodeError there, which the CLI
    then called the user's bad input."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # a TextIOWrapper; a test's capture may be anything
        if reconfigure is not None and getattr(stream, "errors", "strict") == "strict":
            reconfigure(errors="replace")


def is_bad_input(exc: BaseException) -> bool:
    """Whether ``exc`` is the input's fault (exit status 2) rather than keel's (exit status 1)."""
    if isinstance(exc, TrainingAborted):
        return False
    if isinstance(exc, ImportError):  # keel's extras re-raise the library's own ImportError with the pip line
        missing = exc.name or getattr(exc.__cause__, "name", None)
        return missing is not None and missing.split(".")[0] != "keel"
    return isinstance(exc, (KeelError, ValueError, OSError, sqlite3.DatabaseError))


def describe(exc: BaseException) -> str:
    """The message of a bad-input error; an `OSError` as ``PATH: reason`` (Python's own is ``[Errno 2] …``)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        where = f"{exc.filename} → {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        return f"{where}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _warning_line(prog: str, show: Callable[..., None]) -> Callable[..., None]:
    """A `warnings.showwarning` that says a `KeelWarning` as ``PROG: warning: MESSAGE`` and hands others to
    ``show``."""

    def showwarning(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, KeelWarning):
            _say(f"{prog}: warning: {message}")
        else:
            show(message, category, *rest, **kwargs)

    return showwarning


def _say(message: str) -> None:
    print(one_line(message, MAX_MESSAGE), file=sys.stderr, flush=True)


def _debug() -> bool:
    return os.environ.get("KEEL_DEBUG", "") not in ("", "0")


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would hit the broken pipe again; point it at /dev/null first.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
