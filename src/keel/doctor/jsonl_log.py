"""JSON-lines logs: one JSON object per line, each with a step field (``step``, ``global_step``, ``_step`` …).

Nested objects are flattened with ``/`` (``{"train": {"loss": 2}}`` → ``train/loss``). Numbers and numeric
strings become signals (``NaN``/``Infinity`` as written; an integer too large for a float as ±inf); ``null``
means not logged; other values are text and left out. A key repeated in one object keeps its last value, as
every JSON reader does, and the notes say which keys were repeated. A JSON array of such objects (a ``.json``
file) is read the same way. The lines are streamed; a line nested too deeply to parse is counted as not JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from keel.doctor._text import check_text_head, open_text, read_text, undecodable
from keel.doctor.columns import STEP_COLUMNS, find_step_column
from keel.doctor.log import LogReadError, RawLog, parse_number, parse_step
from keel.doctor.table import TableBuilder

MAX_LISTED = 5  # repeated keys named in a note


def read_jsonl_log(path: str | Path) -> RawLog:
    """Read a JSON-lines training log.

    Raises:
        LogReadError: Empty, not text, not JSON lines, or no object with a step field.
    """
    path = Path(path)
    check_text_head(path)
    repeats = RepeatedKeys()
    with open_text(path) as fh:
        try:
            if _first_char(fh) == "[":
                return _read_array(path, repeats)
            lines = _Lines(fh, repeats)
            try:
                log = records_from_objects(path, lines, fmt="jsonl", repeats=repeats)
            except LogReadError as exc:
                no_steps: LogReadError | None = exc  # reported only if the lines are JSON at all
            else:
                no_steps = None
        except UnicodeDecodeError:
            raise undecodable(path, fh) from None
    if not lines.objects or lines.bad > lines.objects:
        raise _not_json_lines(path, lines)
    if no_steps is not None:
        raise no_steps
    if lines.bad:
        log.notes.append(f"{lines.bad} line(s) that are not JSON were skipped")
    return log


def _first_char(fh: TextIO) -> str:
    """The first character that is not white space (then the file is rewound)."""
    head = ""
    while not head and (block := fh.read(1 << 16)):
        head = block.lstrip()
    fh.seek(0)
    return head[:1]


def _read_array(path: Path, repeats: RepeatedKeys) -> RawLog:
    """A file holding one JSON array of log objects, streamed: each item is decoded and put into the table as the file
    is read (memory grows with the table, not with the file). A file that is not valid JSON is read whole again, for
    the error ``json.loads`` gives (where and why)."""
    records = ObjectRecords(repeats)
    try:
        for item in _array_items(path, repeats):
            records.add(item)
    except ValueError:
        return _read_array_whole(path, RepeatedKeys())
    return records.log(path, fmt="jsonl")


_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's white space
_AFTER_ITEM = frozenset(" \t\n\r,]")  # what may follow an item of a valid array
ARRAY_BLOCK_CHARS = 1 << 20  # a streamed JSON array is read this much at a time (more while one item runs on)


def _array_items(path: Path, repeats: RepeatedKeys) -> Iterator[Any]:
    """The items of the JSON array a file holds, decoded one at a time (`load_json`'s decoder); ValueError when the
    file is not one valid JSON array (the caller reads it whole for the error)."""
    decoder = json.JSONDecoder(object_pairs_hook=repeats)
    with open_text(path) as fh:
        buffer, pos, block, ended = "", 0, ARRAY_BLOCK_CHARS, False

        def more() -> bool:
            """Drop what was read, add the next block; False at the end of the file."""
            nonlocal buffer, pos, ended
            chunk = fh.read(block)
            buffer, pos, ended = buffer[pos:] + chunk, 0, not chunk
            return bool(chunk)

        def next_char() -> str:
            """The next character that is not white space ("" at the end), not consumed."""
            nonlocal pos
            while True:
                pos = _WHITESPACE.match(buffer, pos).end()  # type: ignore[union-attr]
                if pos < len(buffer) or not more():
                    return buffer[pos : pos + 1]

        if next_char() != "[":
            raise ValueError("not an array")
        pos += 1
        if next_char() == "]":
            pos += 1
        else:
            while True:
                next_char()
                while True:  # an item that runs on past the buffer (or a number that may) waits for more
                    try:
                        item, end = decoder.raw_decode(buffer, pos)
                    except json.JSONDecodeError:
                        item, end = None, -1
                    except RecursionError:
                        raise ValueError("nested too deeply") from None
                    if end >= 0 and (ended or (end < len(buffer) and buffer[end] in _AFTER_ITEM)):
                        break  # "1" of "1.5" cut after the "1" is not an item yet
                    if not more() and end < 0:
                        raise ValueError("not valid JSON")
                    block = min(block * 2, 1 << 28)  # a long item: fewer, larger reads (linear, not quadratic)
                pos = end
                yield item
                block = ARRAY_BLOCK_CHARS
                separator = next_char()
                pos += 1
                if separator == "]":
                    break
                if separator != ",":
                    raise ValueError("not valid JSON")
        if next_char() != "":
            raise ValueError("extra data")


def _read_array_whole(path: Path, repeats: RepeatedKeys) -> RawLog:
    try:
        items = load_json(read_text(path).lstrip(), repeats)
    except ValueError as exc:
        msg = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise LogReadError(f"{path}: not valid JSON ({msg})") from None
    if not isinstance(items, list):
        raise LogReadError(f"{path}: a JSON value that is not a list of log objects")
    return records_from_objects(path, items, fmt="jsonl", repeats=repeats)


def _not_json_lines(path: Path, lines: _Lines) -> LogReadError:
    try:
        whole = load_json(read_text(path), RepeatedKeys())
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return LogReadError(f"{path}: one JSON object, not a log (not JSON lines, no 'log_history')")
    return LogReadError(
        f"{path}: not JSON lines ({lines.bad} of {lines.bad + lines.objects} non-empty lines are not JSON)"
    )


class _Lines:
    """The JSON values of a file's non-empty lines; lines that are not JSON are counted and skipped."""

    def __init__(self, fh: Iterable[str], repeats: RepeatedKeys) -> None:
        self.fh = fh
        self.repeats = repeats
        self.objects = self.bad = 0

    def __iter__(self) -> Iterator[Any]:
        for line in self.fh:
            if not line.strip():
                continue
            try:
                value = load_json(line, self.repeats)
            except ValueError:
                self.bad += 1
                continue
            self.objects += 1
            yield value


def load_json(text: str, repeats: RepeatedKeys) -> Any:
    """``json.loads`` with repeated keys counted; ValueError for anything that is not JSON (nested too
    deeply, an integer of more than 4300 digits)."""
    try:
        return json.loads(text, object_pairs_hook=repeats)
    except RecursionError:
        raise ValueError("nested too deeply") from None


@dataclass
class RepeatedKeys:
    """A ``json.loads`` object hook that builds each object as ``dict`` does (the last value of a repeated
    key wins) and remembers the repeated keys."""

    objects: int = 0
    names: dict[str, None] = field(default_factory=dict)

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            self.repeated([name for name, _ in pairs])
        return obj

    def repeated(self, names: list[str]) -> None:
        self.objects += 1
        seen: set[str] = set()
        for name in names:
            if name in seen and len(self.names) < MAX_LISTED:
                self.names.setdefault(name)
            seen.add(name)

    def note(self) -> str | None:
        if not self.objects:
            return None
        return (
            f"{self.objects} object(s) with a repeated key ({', '.join(map(repr, self.names))}): the last "
            "value of each was used, as JSON readers do"
        )


def add_entry(
    entries: list[dict[str, Any]] | Entries,
    step: int,
    fields: dict[str, Any],
    *,
    shared: AbstractSet[str] = frozenset(),
) -> None:
    """Append ``{"step": step, **fields}``, or merge it into the last entry when that is of the same step and no name
    but the ``shared`` ones is in both (an evaluation line beside the training line of one iteration); a repeated
    name starts a new entry (a restarted run logs the step again)."""
    last = entries[-1] if entries else None
    if last is not None and last["step"] == step and not (fields.keys() & last.keys()) - shared:
        last.update(fields)
    else:
        entries.append({"step": step, **fields})


def records_from_objects(
    path: Path, objects: Iterable[Any], *, fmt: str, repeats: RepeatedKeys | None = None
) -> RawLog:
    """A `RawLog` from log objects (JSON lines, a JSON list, a Trainer's ``log_history``)."""
    records = ObjectRecords(repeats)
    for item in objects:
        records.add(item)
    return records.log(path, fmt=fmt)


class ObjectRecords:
    """Log objects read into a table one at a time (`records_from_objects`): what is kept of each is its numbers."""

    def __init__(self, repeats: RepeatedKeys | None = None) -> None:
        self._table = TableBuilder()
        self._repeats = repeats or RepeatedKeys()
        self._not_objects = self._no_step = 0
        self._text_fields: set[str] = set()
        self._number_fields: set[str] = set()
        self._step_columns: set[str] = set()
        self._step_column_of: dict[tuple[str, ...], str | None] = {}

    def add(self, item: Any) -> None:
        """Add one log object: its step and its numbers (text values name a text column; others are counted)."""
        if not isinstance(item, dict):
            self._not_objects += 1
            return
        pairs = list(_flatten(item))
        flat = dict(pairs)
        if len(flat) < len(pairs):  # {"train/loss": 1, "train": {"loss": 2}}
            self._repeats.repeated([name for name, _ in pairs])
        names = tuple(flat)
        if names not in self._step_column_of:  # objects of a log mostly share their names: each set looked up once
            self._step_column_of[names] = find_step_column(names)
        step_column = self._step_column_of[names]
        step = parse_step(flat[step_column]) if step_column is not None else None
        if step is None:
            self._no_step += 1
            return
        self._step_columns.add(step_column)  # type: ignore[arg-type]
        values: dict[str, float] = {}
        for name, raw in flat.items():
            if name == step_column or raw is None:
                continue
            value = parse_number(raw)
            if value is None:
                self._text_fields.add(name)
            else:
                self._number_fields.add(name)
                values[name] = value
        self._table.add(step, values)

    def log(self, path: Path, *, fmt: str) -> RawLog:
        """The `RawLog` of the objects added; `LogReadError` when none had a step."""
        if not len(self._table):
            raise LogReadError(f"{path}: no log object has a step field; allowed names: {', '.join(STEP_COLUMNS)}")
        log = RawLog(source=str(path), format=fmt, records=self._table.build())
        log.step_column = ", ".join(sorted(self._step_columns))
        log.text_columns = sorted(self._text_fields - self._number_fields)
        if self._not_objects:
            log.notes.append(f"{self._not_objects} entr(ies) that are not JSON objects were skipped")
        if self._no_step:
            log.notes.append(f"{self._no_step} object(s) without an integer step were skipped")
        if note := self._repeats.note():
            log.notes.append(note)
        return log


class Entries:
    """A line log's entries (``{"step": N, name: value, ...}``), each read into an `ObjectRecords` once the next one
    starts: a reader holds one entry's fields, not every step's (a 2-month run's console has millions of steps).

    `add_entry` merges into the last one (``entries[-1]``) or appends as it does to a list.
    """

    def __init__(self) -> None:
        self._records = ObjectRecords()
        self._last: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return self._last is not None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index != -1 or self._last is None:
            raise IndexError("only the last entry is kept")
        return self._last

    def __setitem__(self, index: int, entry: dict[str, Any]) -> None:
        self[index]  # noqa: B018 - the same IndexError as reading it: only the last entry can be replaced
        self._last = entry

    def append(self, entry: dict[str, Any]) -> None:
        if self._last is not None:
            self._records.add(self._last)
        self._last = entry

    def log(self, path: Path, *, fmt: str) -> RawLog:
        """The `RawLog` of every entry (`ObjectRecords.log`)."""
        if self._last is not None:
            self._records.add(self._last)
            self._last = None
        return self._records.log(path, fmt=fmt)


def _flatten(item: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(``outer/inner`` name, value) of every non-object, non-list value, depth first in the object's order.

    With a stack rather than recursion: JSON nested nearly as deep as the parser allows must not overflow it.
    """
    stack = [("", iter(item.items()))]
    while stack:
        prefix, items = stack[-1]
        for key, value in items:
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                stack.append((name + "/", iter(value.items())))
                break
            if not isinstance(value, list):
                yield name, value
        else:
            stack.pop()
