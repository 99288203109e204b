"""modded-nanogpt speedrun logs: ``records/<date>_<name>/<uuid>.txt`` as its ``train_gpt.py`` writes them.

Such a log opens with the script's own source code and ``nvidia-smi``'s table (the speedrun keeps the code with
its result), then one line per step from column 0: ``step:N/TOTAL name:value ...`` (``step:1/6200
train_loss:10.9184 train_time:74701ms step_avg:nanms``; ``step:0/6200 val_loss:10.9264 ...``; records from 2025
on log only the clock each step and ``val_loss`` every 125 steps), and a ``peak memory`` line at the end.
Only lines that begin with ``step:`` are metric lines; every other line is the header or the trailer and is
left out (counted in a note) — the source code in the header is not indented at column 0 with ``step:``, so it
is never read as data. A ``step:`` line that does not parse is one error that names it.

``train_loss`` and ``val_loss`` map to ``loss`` and ``val/loss``; a value's time unit joins its name
(``train_time_ms``, ``step_avg_ms``: cumulative and running-average clocks, not per-step times). The train and
val lines of one step make one record (both carry the clock: the later clock reading is kept).
"""

from __future__ import annotations

import re
from pathlib import Path

from keel.doctor._text import read_lines
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog, malformed_line
from keel.doctor.step_lines_log import NAME_VALUE, with_unit

FORMAT = "modded_nanogpt"
_PREFIX = "step:"
_LINE = re.compile(r"step:(\d+)/(\d+)((?:[ \t]+[A-Za-z_][\w/.-]*:\S+)+)[ \t]*")
_SEARCH = re.compile(r"^step:\d+/\d+(?:[ \t]+[A-Za-z_][\w/.-]*:\S+)+[ \t]*\r?$", re.MULTILINE)


def looks_like_speedrun(text: str) -> bool:
    """Whether ``text`` holds a ``step:N/TOTAL name:value`` line at column 0 (anywhere: the header comes first)."""
    return _SEARCH.search(text) is not None


def read_speedrun_log(path: str | Path) -> RawLog:
    """Read a modded-nanogpt speedrun log.

    Raises:
        LogReadError: A ``step:`` line that is not ``step:N/TOTAL name:value ...`` (named by its number), or no
            such line at all.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.txt"
        >>> _ = p.write_text("import os\\nstep:0/2 val_loss:10.9 train_time:0ms\\nstep:1/2 train_loss:10.8\\n")
        >>> list(read_speedrun_log(p).records)
        [(0, {'val_loss': 10.9, 'train_time_ms': 0.0}), (1, {'train_loss': 10.8})]
    """
    path = Path(path)
    entries = Entries()
    clocks: set[str] = set()  # names with a time unit: written on the train and the val line of a step alike
    other_lines = 0
    text = read_lines(path)
    for number, line in enumerate(text.lines, start=1):
        if not line.startswith(_PREFIX):
            other_lines += bool(line.strip())
            continue
        values = _parse(line, clocks)
        if values is None:
            if text.cut_off(number):
                break
            raise malformed_line(path, number, line, "is not 'step:N/TOTAL name:value ...' (modded-nanogpt)")
        step = int(values.pop("step"))
        add_entry(entries, step, values, shared=clocks)
    if not entries:
        raise LogReadError(f"{path}: no 'step:N/TOTAL name:value' line at the start of a line (modded-nanogpt)")
    log = entries.log(path, fmt=FORMAT)
    text.note(log.notes)
    if other_lines:
        log.notes.append(f"{other_lines} lines that are not step lines (the script's source, nvidia-smi) left out")
    return log


def _parse(line: str, clocks: set[str]) -> dict[str, float | str] | None:
    m = _LINE.fullmatch(line.rstrip("\r"))
    if m is None:
        return None
    values: dict[str, float | str] = {"step": m.group(1)}
    for token in m.group(3).split():
        pair = NAME_VALUE.fullmatch(token)
        if pair is None:
            return None
        name = with_unit(pair.group(1), pair.group(3))
        if pair.group(3):
            clocks.add(name)
        values[name] = pair.group(2)
    return values
