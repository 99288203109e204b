"""argparse ``type=`` checks for the ``keel`` command line: a bad value is refused before any work starts.

Each check raises `ArgumentValueError` (an `argparse.ArgumentTypeError`) naming the value and what is
allowed, so argparse answers it with one ``keel VERB: error: argument --flag: …`` line and exit status 2
(see `keel.cli`). Every layer's CLI module (doctor, report, store exporters, sweep, bench) can import
`_core`, so the checks live here once.

Example:
    >>> parser = argparse.ArgumentParser(prog="keel x")
    >>> _ = parser.add_argument("--steps", type=positive_int)
    >>> parser.parse_args(["--steps", "20"]).steps
    20
    >>> positive_int("-5")
    Traceback (most recent call last):
    ...
    keel._core.argtypes.ArgumentValueError: '-5'; allowed: an int from 1 to 2**63 - 1
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# What SQLite and torch hold: a count, step or seed past it cannot be stored or seeded (and would run forever).
INT64_MAX = 2**63 - 1


class ArgumentValueError(argparse.ArgumentTypeError, ValueError):
    """A refused value: argparse reports it as ``argument --flag: MESSAGE``; called directly (a check a verb
    makes after parsing) it is a `ValueError`, which `keel.cli` answers the same way."""


def show(value: str, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message names the value without pasting a huge one."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…'"


def int_range(low: int, high: int = INT64_MAX) -> Callable[[str], int]:
    """A check accepting a decimal int in ``[low, high]``."""

    allowed = f"an int from {low} to {'2**63 - 1' if high == INT64_MAX else high}"

    def check(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None  # not an int, or more digits than Python converts: refused below all the same
        if value is None or not low <= value <= high:
            raise ArgumentValueError(f"{show(text)}; allowed: {allowed}")
        return value

    check.__name__ = allowed
    return check


positive_int = int_range(1)
nonnegative_int = int_range(0)
# torch.set_num_threads takes a C int, and more threads than cores only slow a benchmark down.
cpu_threads = int_range(1, os.cpu_count() or 1)


def float_range(low: float, *, inclusive: bool) -> Callable[[str], float]:
    """A check accepting a finite float above ``low`` (or equal to it when ``inclusive``)."""
    allowed = f"a finite number {'>=' if inclusive else '>'} {low:g}"

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise ArgumentValueError(f"{show(text)}; allowed: {allowed}")
        return value + 0.0  # -0.0 → 0.0

    check.__name__ = allowed
    return check


positive_float = float_range(0.0, inclusive=False)
nonnegative_float = float_range(0.0, inclusive=True)


def any_path(text: str) -> Path:
    """A check accepting any path but an empty one or one with a NUL byte (no file system accepts those)."""
    if text == "":
        raise ArgumentValueError("'' (an empty path); allowed: a path")
    if "\x00" in text:
        raise ArgumentValueError(f"{show(text)} contains a NUL byte; allowed: a path")
    return Path(text)


def existing_path(text: str) -> Path:
    """A check accepting a path that exists (a file or a folder; the reader decides what is in it)."""
    path = any_path(text)
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long, a symlink loop: the file system's own reason
        raise ArgumentValueError(f"{show(text)}: {exc.strerror}") from exc
    if not exists:
        dangling = path.is_symlink()
        raise ArgumentValueError(f"{show(text)} {'is a symlink to nothing' if dangling else 'does not exist'}")
    return path


def output_file(text: str) -> Path:
    """A check accepting a file path keel can write: a regular file to replace, or a new file in a folder
    that exists or can be created. A folder, a FIFO or a device is refused (writing a FIFO blocks forever)."""
    path = any_path(text)
    try:
        if path.is_dir():
            raise ArgumentValueError(f"{show(text)} is a folder; allowed: a file path")
        if path.exists() and not path.is_file():
            raise ArgumentValueError(f"{show(text)} is not a regular file; allowed: a file path")
    except OSError as exc:
        raise ArgumentValueError(f"{show(text)}: {exc.strerror}") from exc
    _check_writable(text, path.parent)
    return path


def output_dir(text: str) -> Path:
    """A check accepting a folder keel can write in: one that exists, or one that can be created."""
    path = any_path(text)
    try:
        if path.exists() and not path.is_dir():
            raise ArgumentValueError(f"{show(text)} exists and is not a folder; allowed: a folder")
        if path.is_symlink() and not path.exists():  # mkdir would fail on it after the work began
            raise ArgumentValueError(f"{show(text)} is a symlink to nothing; allowed: a folder")
    except OSError as exc:
        raise ArgumentValueError(f"{show(text)}: {exc.strerror}") from exc
    _check_writable(text, path)
    return path


def _check_writable(text: str, folder: Path) -> None:
    # The nearest folder that exists is where the first file or sub-folder would be created. Trying it is the
    # only reliable answer: os.access says yes to root on read-only and pseudo file systems (/sys).
    try:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        is_dir = folder.is_dir()
    except OSError as exc:
        raise ArgumentValueError(f"{show(text)}: {exc.strerror}") from exc
    if not is_dir:
        raise ArgumentValueError(f"{show(text)}: {show(str(folder))} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):  # O_TMPFILE where supported: no name ever appears
            pass
    except OSError as exc:
        raise ArgumentValueError(f"{show(text)}: cannot write in {show(str(folder))} ({exc.strerror or exc})") from exc


def device(*choices: str) -> Callable[[str], str]:
    """A check accepting one of ``choices`` (``cpu``, ``cuda``, ``auto``), ``cuda`` only when CUDA is available.

    torch is imported only when a value is checked, so ``keel --help`` stays free of it.
    """
    others = ", ".join(c for c in choices if c != "cuda")

    def check(text: str) -> str:
        if text not in choices:
            raise ArgumentValueError(f"{show(text)}; allowed: {', '.join(choices)}")
        if text == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ArgumentValueError(f"'cuda' but no CUDA device is available; allowed: {others}")
        return text

    check.__name__ = "device"
    return check
