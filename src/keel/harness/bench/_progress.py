"""The progress of a benchmark: a tqdm bar (`keel.guard.console.progress_bar`) fed by the benchmark's callback."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from keel.guard.console import progress_bar


@contextlib.contextmanager
def bench_progress(total: int, desc: str, *, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A ``progress(message)`` callback that moves a bar of ``total`` steps one step on, showing the message.

    Off when ``enabled`` is False (``--json``) and when stderr is not a terminal; never on stdout.
    """
    with progress_bar(total, desc, enabled=enabled) as bar:

        def advance(message: str) -> None:
            bar.set_postfix_str(message, refresh=False)
            bar.update()

        yield advance
