"""Progress bars for long work: tqdm on stderr, only when stderr is a terminal, gone when the work is done.

One place for the bar every verb draws — `keel export` and `keel report` over a run's steps, `keel doctor` over a
folder's runs, the benchmarks over their repeats (`keel.guard.console.progress_bar` adds keel's log lines written
through it) — so they look and behave alike and never write into a verb's output or ``--json``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

UNIT_SCALE_FROM = 10_000  # a bar this long counts in k and M


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, *, enabled: bool = True, unit: str = "it") -> Iterator[Any]:
    """A tqdm bar of ``total`` units: on stderr, only when stderr is a terminal (and ``enabled``), gone when done.

    Example:
        >>> with progress_bar(3, "repeats", enabled=False) as bar:
        ...     for _ in range(3):
        ...         bar.update()
    """
    from tqdm import tqdm  # imported here: a training loop, or a store read by code, never needs it

    # a pty nobody sized (`script`, some CI runners) reports 0 rows and columns: tqdm hid the bar below row 0
    unsized = _terminal_size(sys.stderr) == 0
    with tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=total is not None and total >= UNIT_SCALE_FROM,  # 523k/1.00M steps; 2/3 runs (not 2.00/3.00)
        file=sys.stderr,
        leave=False,
        dynamic_ncols=not unsized,
        ncols=UNSIZED_COLUMNS if unsized else None,
        nrows=UNSIZED_ROWS if unsized else None,
        disable=None if enabled else True,
    ) as bar:
        yield bar


UNSIZED_COLUMNS, UNSIZED_ROWS = 80, 24  # the bar's terminal when it reports 0 rows or columns


def _terminal_size(stream: TextIO) -> int | None:
    """The smaller of the rows and columns of the terminal ``stream`` writes to; None when it cannot tell."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return min(size.columns, size.lines)


@contextlib.contextmanager
def step_progress(
    span: tuple[int, int] | None, desc: str, *, enabled: bool = True, unit: str = "step"
) -> Iterator[Callable[[int], None]]:
    """A ``reached(step)`` callback that moves a `progress_bar` over the steps ``span`` covers (first, last) to
    ``step``, or over other units of work (``(0, len(runs))``, ``unit="run"``). Steps that go back (a resumed run's)
    do not move it.

    Example:
        >>> with step_progress((0, 10), "keel export", enabled=False) as reached:
        ...     reached(5)
    """
    first, last = span or (0, 0)
    with progress_bar(last - first, desc, enabled=enabled, unit=unit) as bar:
        done = first

        def reached(step: int) -> None:
            nonlocal done
            if step > done:
                bar.update(step - done)
                done = step

        yield reached


def print_above_progress(text: str, *, file: TextIO | None = None) -> None:
    """Print ``text`` to stdout (or ``file``) with a progress bar on the terminal cleared first and drawn again
    after: a verb's output lines and its bar never break each other."""
    from tqdm import tqdm

    tqdm.write(text, file=file if file is not None else sys.stdout)
