"""Step lines of name/value fields after ``step N |``: torchtune's metric loggers and NeMo Automodel's console.

torchtune's ``DiskLogger`` (``log_dir/log_<unix time>.txt``) and ``StdoutLogger`` write one line per logged step::

    Step 10 | loss:1.0359 lr:2e-05 tokens_per_second_per_gpu:962.22 grad_norm:tensor(0.9512, device='cuda:0')

(a tensor-valued field prints as ``tensor(...)``: its number is read). NeMo Automodel's recipes log::

    2026-08-10 15:49:02 | INFO | root | step 14 | epoch 0 | loss 0.7505 | grad_norm 1.2398 | lr 1.00e-05 | mem 25.49 GiB

A line is read when ``step N |`` (either case) is followed by fields: ``name:value``, ``name=value`` (a comma
after it is allowed) or, between ``|`` marks, ``name value``. A memory or time unit after a value joins its name
(``mem_gib``); a parenthesised aside after a value (``tps 6574.51(821.81/gpu)``) is left out. A field that is not
a name and a number (a text value, ``epoch 0/3``) is left out, its words counted in a note; so is every other line
(banners, warnings, progress bars), and a line that repeats the step and fields of the line before (another rank's
copy). Only lines with at least one number are steps; detection asks for a field whose name holds ``loss``.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from keel.doctor._text import read_lines
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog

FORMAT = "step_fields"
_NUMBER = r"[-+]?(?:\d{1,30}(?:\.\d{0,30})?(?:[eE][-+]?\d{1,4})?|\.\d{1,30}(?:[eE][-+]?\d{1,4})?|nan|inf)"
# every quantifier bounded: a 100,000-character line is read in linear time
_STEP = re.compile(r"(?:^|(?<=[\s|\]:]))[Ss]tep[ \t]{1,20}(\d{1,18})[ \t]{0,20}\|")
_UNIT = r"[KMGT]i?B|[mun]?s|%"
_LOOKED_AT = 100  # step lines detection reads at most: a huge file of them is answered from its first ones
_FIELD = re.compile(
    rf"[ \t]*([A-Za-z_][\w./-]{{0,63}})(?:[ \t]{{0,20}}[:=][ \t]{{0,20}}|[ \t]{{1,20}})"
    rf"(?:tensor\([ \t]{{0,20}}({_NUMBER})[^)]{{0,200}}\)|({_NUMBER}))"
    rf"(?:[ \t]{{0,20}}({_UNIT})(?![\w:=]))?(?:\([^)]{{0,100}}\))?,?(?=[ \t]|$)",
    re.IGNORECASE,
)
UNITS = {"%": "percent"}


def looks_like_step_fields(text: str) -> bool:
    """Whether ``text`` holds a ``step N | ... loss ...`` line."""
    if "tep" not in text:  # a fast answer for the logs that detection tries this on
        return False
    for m in itertools.islice(_STEP.finditer(text), _LOOKED_AT):
        end = text.find("\n", m.end())
        if "loss" in text[m.end() : end if end >= 0 else len(text)].lower():
            return True
    return False


def read_step_fields_log(path: str | Path) -> RawLog:
    """Read a log of ``step N | name:value ...`` lines (torchtune, NeMo Automodel).

    Raises:
        LogReadError: No ``step N |`` line with a number in it.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log_1723844072.txt"
        >>> _ = p.write_text("Step 1 | loss:2.0853 lr:2e-05 grad_norm:tensor(0.95, device='cuda:0') \\n")
        >>> list(read_step_fields_log(p).records)
        [(1, {'loss': 2.0853, 'lr': 2e-05, 'grad_norm': 0.95})]
    """
    path = Path(path)
    entries = Entries()
    last: tuple[int, dict[str, str]] | None = None
    other_lines = copies = left_out = 0
    for raw in read_lines(path).lines:
        m = _STEP.search(raw)
        fields, unread = _fields(raw[m.end() :]) if m is not None else ({}, 0)
        if m is None or not fields:
            other_lines += bool(raw.strip())
            continue
        step = int(m.group(1))
        if last == (step, fields):
            copies += 1
            continue
        last = (step, fields)
        left_out += unread
        add_entry(entries, step, dict(fields))
    if not entries:
        raise LogReadError(f"{path}: no 'step N | name:value ...' line (torchtune, NeMo Automodel)")
    log = entries.log(path, fmt=FORMAT)
    if copies:
        log.notes.append(f"{copies} step lines that repeat the line before (other ranks) left out")
    if left_out:
        log.notes.append(f"{left_out} words of step lines that are not in a name-value field left out")
    if other_lines:
        log.notes.append(f"{other_lines} lines that are not step lines left out")
    return log


def _fields(text: str) -> tuple[dict[str, str], int]:
    """The ``name value`` fields of a step line's rest, and how many of its words were in none."""
    fields: dict[str, str] = {}
    unread = 0
    for segment in text.split("|"):
        position, end = 0, len(segment.rstrip())
        while position < end:
            m = _FIELD.match(segment, position)
            if m is None:  # not a field: skip to the next word
                unread += 1
                space = segment.find(" ", position + 1)
                position = end if space < 0 else space
                while position < end and segment[position] in " \t":
                    position += 1
                continue
            name, tensor_value, value, unit = m.groups()
            position = m.end()
            name = name.lower()
            fields[f"{name}_{UNITS.get(unit, unit.lower())}" if unit else name] = tensor_value or value
    return fields, unread
