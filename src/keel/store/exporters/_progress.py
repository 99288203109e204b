"""A progress bar over a run's steps, on stderr, for the verbs that read a whole store (export, report).

The store layer imports nothing above `keel._core`, so this is tqdm itself rather than
`keel.guard.console.progress_bar` (which also routes keel's training log lines through the bar; nothing logs
while a store is exported).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

UNIT_SCALE_FROM = 10_000  # a bar this long counts in k and M


@contextlib.contextmanager
def step_progress(
    span: tuple[int, int] | None, desc: str, *, enabled: bool = True, unit: str = "step"
) -> Iterator[Callable[[int], None]]:
    """A ``reached(step)`` callback that moves a bar over the steps ``span`` covers (first, last) to ``step``, or
    over other units of work (``(0, len(runs))``, ``unit="run"``).

    On stderr only, and only when stderr is a terminal and ``enabled``; gone when the work is done, so a
    terminal keeps only the verb's own output. Steps that go back (a resumed run's) do not move it.

    Example:
        >>> with step_progress((0, 10), "keel export", enabled=False) as reached:
        ...     reached(5)
    """
    from tqdm import tqdm  # imported here: `keel.store` is read by code that never shows a bar

    first, last = span or (0, 0)
    with tqdm(
        total=last - first,
        desc=desc,
        unit=unit,
        unit_scale=last - first >= UNIT_SCALE_FROM,  # 523k/1.00M steps; 2/3 runs (not 2.00/3.00)
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        disable=None if enabled else True,
    ) as bar:
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
