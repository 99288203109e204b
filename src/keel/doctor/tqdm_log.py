"""A console log whose metrics are a tqdm progress bar's postfix: Lightning's ``TQDMProgressBar`` (the metrics logged
with ``prog_bar=True``), OpenRLHF's trainers, and any loop that calls ``bar.set_postfix(loss=..., lr=...)``
(``python train.py 2>&1 | tee train.log``).

tqdm redraws its bar after each update (``format_meter``: ``{desc}: {pct}%|{bar}| {n}/{total} [{elapsed}<{remaining},
{rate}, {postfix}]``, or ``{desc}: {n}it [{elapsed}, {rate}, {postfix}]`` without a total), separated by ``\\r`` in
a file; ``set_postfix`` writes each value ``name=value``, a number in ``format_num``'s 3 significant digits::

    Train step of epoch 0:  10%|█         | 10/100 [00:30<04:30,  3.00s/it, gpt_loss=2.34, lr=5e-6, grad_norm=0.9]

Each count with a ``name=value`` postfix is a record (the loop's own steps: micro-steps for OpenRLHF's SFT bar); of
a count drawn twice, the drawing that holds that step's values is kept (`_entries`). Only the bar drawn most often
with a postfix is read (a run's evaluation bar is another: left out, counted in a note). A bar that reached its
total and starts again (the next epoch, the next PPO round) continues the count; one that starts again before
reaching it is a restart, as in any log. Terminal escapes are left out (`keel.doctor._text.strip_ansi`); every
other line is left out and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from keel.doctor._text import read_lines
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog

FORMAT = "tqdm"
_TAIL = 4000  # characters at the end of a segment looked at: a bar is short, a hostile line is not
# the count (and total, or tqdm's "it") before the bracket that ends a redraw
_COUNT = re.compile(r"(?:^|(?<=[\s|]))(\d{1,18})(?:/(\d{1,18})|it)[ \t]{0,5}$")
_PERCENT = re.compile(r"[ \t]{0,5}\d{1,3}%\|")
_DIGITS = re.compile(r"\d+")


@dataclass
class _Redraw:
    bar: str  # the bar's description as drawn
    n: int
    total: int | None
    fields: dict[str, str]


def looks_like_tqdm_postfix(text: str) -> bool:
    """Whether ``text`` holds a tqdm redraw with a ``name=value`` postfix."""
    return "=" in text and any(_redraw(segment) for segment in _segments(text, limit=200))


def read_tqdm_log(path: str | Path) -> RawLog:
    """Read a console log of tqdm bars with a postfix, streamed: its redraws are split at each ``\\r`` and ``\\n``
    as they are read (a console of one line that never printed a newline too), and each kind of bar's steps go
    into a table of their own as they come, so memory grows with the steps kept, not with the file.

    Raises:
        LogReadError: No tqdm redraw with a ``name=value`` postfix.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("\\rtrain:  1%|| 1/100 [00:01<01:39, 1.00s/it, loss=2.5]\\r"
        ...                  "train:  2%|| 2/100 [00:02<01:38, 1.00s/it, loss=2.41]\\n")
        >>> list(read_tqdm_log(p).records)
        [(1, {'loss': 2.5}), (2, {'loss': 2.41})]
    """
    path = Path(path)
    bars: dict[str, _Counts] = {}  # kind of bar ("Epoch #") -> its steps, in the order first drawn
    kind_of: dict[str, str] = {}
    other = 0
    for segment in read_lines(path, at_returns=True).lines:
        redraw = _redraw(segment)
        if redraw is None:
            other += bool(segment.strip())
            continue
        kind = kind_of.get(redraw.bar)
        if kind is None:
            kind = kind_of[redraw.bar] = _DIGITS.sub("#", redraw.bar)  # "Epoch 3" is an "Epoch #" bar
        bars.setdefault(kind, _Counts()).add(redraw)
    if not bars:
        raise LogReadError(f"{path}: no tqdm progress bar with a 'name=value' postfix")
    main = max(bars, key=lambda kind: bars[kind].redraws)  # the first of the most drawn
    log = bars[main].entries.log(path, fmt=FORMAT)
    left_out = sum(bar.redraws for bar in bars.values()) - bars[main].redraws
    log.notes.append(f"the steps are the counts of the progress bar {main.strip() or '(no description)'!r}")
    if left_out:
        log.notes.append(f"{left_out} redraws of other progress bars (an evaluation's) left out")
    if other:
        log.notes.append(f"{other} lines that are not progress-bar redraws with values left out")
    return log


def _segments(text: str, limit: int | None = None) -> list[str]:
    """The text's lines and ``\r``-separated redraws (the first ``limit`` of them)."""
    parts = re.split(r"[\r\n]", text, maxsplit=limit or 0)
    return parts[:limit] if limit is not None else parts


def _redraw(segment: str) -> _Redraw | None:
    tail = segment[-_TAIL:].rstrip()
    opening = tail.rfind("[")
    if not tail.endswith("]") or opening < 0 or "=" not in tail[opening:]:
        return None
    m = _COUNT.search(tail, 0, opening)
    if m is None:
        return None
    fields: dict[str, str] = {}
    for part in tail[opening + 1 : -1].split(", "):
        name, equals, value = part.partition("=")
        if equals and name.strip():
            fields[name.strip()] = value.strip()
    if not fields:
        return None
    head = tail[: m.start()]
    percent = _PERCENT.search(head)
    bar = (head[: percent.start()] if percent else head).strip().rstrip(":")
    total = int(m.group(2)) if m.group(2) else None
    return _Redraw(bar=bar, n=int(m.group(1)), total=total, fields=fields)


class _Counts:
    """One kind of bar's redraws turned into entries as they come: one entry per count (count 0, before any update,
    left out); a finished bar drawn anew, or another bar, continues the count.

    A bar cut short (a killed run) followed by a bar drawn before (the resumed run's epoch) starts again at that
    bar's steps: the doctor lists the restart. A count is drawn twice: by ``update`` and by ``set_postfix``.
    Lightning updates, then sets the step's values (``29/40 …loss=0.019``, ``29/40 …loss=0.0201``: the last drawing
    of a count is its step's); OpenRLHF sets them, then updates (``0/100 …loss=2.5``, ``1/100 …loss=2.5``,
    ``1/100 …loss=2.4``: the first is). The second shows itself by a postfix already at count 0 of the first bar.
    """

    def __init__(self) -> None:
        self.entries = Entries()
        self.redraws = 0
        self._set_before_update: bool | None = None
        self._offset = 0
        self._started: dict[str, int] = {}  # each bar's first offset: a resumed run drawing it again starts there
        self._last: _Redraw | None = None

    def add(self, redraw: _Redraw) -> None:
        self.redraws += 1
        if self._set_before_update is None:
            self._set_before_update = redraw.n == 0
        last = self._last
        if last is not None and (redraw.n < last.n or redraw.bar != last.bar):
            if last.total is not None and last.n >= last.total:  # finished: the next epoch or round
                self._offset += last.total
            elif redraw.bar in self._started and redraw.bar != last.bar:  # cut short, then an earlier bar: a resume
                self._offset = self._started[redraw.bar]
            elif redraw.bar != last.bar:
                self._offset += last.n
            # the same bar starting over before its total: a restart at its own counts
        self._started.setdefault(redraw.bar, self._offset)
        same_count = last is not None and redraw.n == last.n and redraw.bar == last.bar
        self._last = redraw
        if redraw.n == 0 or (same_count and self._set_before_update):
            return
        step = self._offset + redraw.n
        if same_count and self.entries and self.entries[-1]["step"] == step:
            self.entries[-1] = {"step": step, **redraw.fields}
        else:
            add_entry(self.entries, step, dict(redraw.fields))
