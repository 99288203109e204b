"""JSON-lines logs: one JSON object per line, each with a step field (``step``, ``global_step``, ``_step`` …).

Nested objects are flattened with ``/`` (``{"train": {"loss": 2}}`` → ``train/loss``). Numbers and numeric
strings become signals (``NaN``/``Infinity`` as written); ``null`` means not logged; other values are text
and left out. A JSON array of such objects (a ``.json`` file) is read the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from keel.doctor._text import read_text
from keel.doctor.columns import STEP_COLUMNS, find_step_column
from keel.doctor.log import LogReadError, RawLog, parse_number, parse_step


def read_jsonl_log(path: str | Path) -> RawLog:
    """Read a JSON-lines training log.

    Raises:
        LogReadError: Empty, not text, not JSON lines, or no object with a step field.
    """
    path = Path(path)
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise LogReadError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(items, list):
            raise LogReadError(f"{path}: a JSON value that is not a list of log objects")
        return records_from_objects(path, items, fmt="jsonl")
    objects: list[Any] = []
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            objects.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    if not objects or bad > len(objects):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            raise LogReadError(f"{path}: one JSON object, not a log (not JSON lines, no 'log_history')")
        raise LogReadError(f"{path}: not JSON lines "
                           f"({bad} of {bad + len(objects)} non-empty lines are not JSON)")
    log = records_from_objects(path, objects, fmt="jsonl")
    if bad:
        log.notes.append(f"{bad} line(s) that are not JSON were skipped")
    return log


def records_from_objects(path: Path, objects: Iterable[Any], *, fmt: str) -> RawLog:
    """A `RawLog` from log objects (JSON lines, a JSON list, a Trainer's ``log_history``)."""
    log = RawLog(source=str(path), format=fmt)
    not_objects = no_step = 0
    text_fields: set[str] = set()
    number_fields: set[str] = set()
    step_columns: set[str] = set()
    for item in objects:
        if not isinstance(item, dict):
            not_objects += 1
            continue
        flat = dict(_flatten(item))
        step_column = find_step_column(flat)
        step = parse_step(flat[step_column]) if step_column is not None else None
        if step is None:
            no_step += 1
            continue
        step_columns.add(step_column)  # type: ignore[arg-type]
        values: dict[str, float] = {}
        for name, raw in flat.items():
            if name == step_column or raw is None:
                continue
            value = parse_number(raw)
            if value is None:
                text_fields.add(name)
            else:
                number_fields.add(name)
                values[name] = value
        log.records.append((step, values))
    if not log.records:
        raise LogReadError(f"{path}: no log object has a step field; "
                           f"allowed names: {', '.join(STEP_COLUMNS)}")
    log.step_column = ", ".join(sorted(step_columns))
    log.text_columns = sorted(text_fields - number_fields)
    if not_objects:
        log.notes.append(f"{not_objects} entr(ies) that are not JSON objects were skipped")
    if no_step:
        log.notes.append(f"{no_step} object(s) without an integer step were skipped")
    return log


def _flatten(item: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in item.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + "/")
        elif not isinstance(value, list):
            yield name, value
