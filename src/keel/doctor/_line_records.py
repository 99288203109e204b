"""A console log of one line per step — ``<prefix> N<separator>name<sep>value…`` — read into a `RawLog`.

The loop every such reader runs (verl, MaxText): find each line's step with the reader's pattern, parse the rest
with its field parser, count the lines and parts left out, and say so in the log's notes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from keel.doctor._text import read_lines
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog

Fields = Callable[[str], tuple[dict[str, float | str], int]]  # a line's rest -> (its fields, parts not a field)


def read_line_records(
    path: Path,
    step: re.Pattern[str],
    fields: Fields,
    *,
    fmt: str,
    line: str,
    field: str,
    counted: tuple[re.Pattern[str], str] | None = None,
) -> RawLog:
    """The records of the lines where ``step`` (group 1: the step) matches, their rest parsed by ``fields``.

    Args:
        path: The log file (terminal colours are left out by `read_lines`).
        step: Where a step line's step is; the fields follow the match.
        fields: The rest of a step line → its fields and how many parts were not a field.
        fmt: The log's format name.
        line: A step line's form, for the error ("'step:N - name:value - ...' line (verl's console logger)").
        field: A field's form, for the note on parts left out ("'name:value'").
        counted: Lines worth their own note (a loss scaler's overflows): their pattern and the note, with
            ``{count}`` for how many there were; they are left out like every other line.

    Raises:
        LogReadError: No step line.
    """
    entries = Entries()
    other_lines = unread = aside = 0
    for text in read_lines(path).lines:
        m = step.search(text)
        if m is None:
            if counted is not None and counted[0].search(text):
                aside += 1
            else:
                other_lines += bool(text.strip())
            continue
        found, left_out = fields(text[m.end() :])
        unread += left_out
        add_entry(entries, int(m.group(1)), found)
    if not entries:
        raise LogReadError(f"{path}: no {line}")
    log = entries.log(path, fmt=fmt)
    if unread:
        log.notes.append(f"{unread} fields of step lines that are not {field} left out")
    if aside and counted is not None:
        log.notes.append(counted[1].format(count=aside))
    if other_lines:
        log.notes.append(f"{other_lines} lines that are not step lines left out")
    return log
