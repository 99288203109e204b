"""fairseq / metaseq stdout logs: ``fairseq-train``, OPT's metaseq, and the trainers built on them.

Each logging interval is one line from the ``train_inner`` logger; with ``--log-format json`` (metaseq's way)::

    2022-05-02 09:14:07 | INFO | train_inner | {"epoch": 1, "update": 0.002, "loss": "10.812", "ppl": "1797.6",
    "num_updates": "20", "lr": "6e-05", "gnorm": "8.314", "loss_scale": "16", "wall": "212"}

(one line in the log), and with ``--log-format simple`` (fairseq's default without a terminal)::

    2022-05-02 11:40:55 | INFO | train_inner | epoch 003:    200 / 1250 loss=6.105, ppl=68.83, num_updates=2700,
    lr=0.000284, gnorm=0.912, train_wall=41

The step is ``num_updates``, the updates applied so far. Each evaluation is a ``valid`` line, a JSON object whose
names carry the subset (``valid_loss``, ``valid_num_updates``) or ``epoch 003 | valid on 'valid' subset | loss 5.93
| num_updates 2750``: the ``valid`` subset's values become ``val_*`` (``val_loss``), another subset's keep its name
(``valid_small_loss``). The end-of-epoch ``train`` line (averages over the epoch) and every other line are left out,
counted in a note, as are the mixed-precision overflow lines (``NOTE: gradient overflow detected, ignoring gradient,
setting loss scale to: 64.0``): fairseq does not count the update it skips, so they have no step of their own; the
next interval's ``loss_scale`` shows the halving. A ``train_inner`` or ``valid`` line that does not parse is one error
that names it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from keel.doctor._text import read_lines
from keel.doctor.columns import normalize
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog, malformed_line

FORMAT = "fairseq"
_TAGGED = re.compile(r"\|\s*(train_inner|valid[\w-]*)\s*\|\s*(.*)")
_SEARCH = re.compile(r"\|\s*train_inner\s*\|\s*(?:\{|epoch\s+\d+\s*:)")
_SIMPLE_TRAIN = re.compile(r"epoch\s+\d+\s*:\s*\d+\s*/\s*\d+\s+(.*)")
_SIMPLE_VALID = re.compile(r"epoch\s+\d+\s*\|\s*valid on '([^']*)' subset\s*\|(.*)")
_OVERFLOW = re.compile(r"gradient overflow detected")
STEP = "num_updates"


def looks_like_fairseq(text: str) -> bool:
    """Whether ``text`` holds a fairseq ``| train_inner | {...}`` or ``| train_inner | epoch N: ...`` line."""
    return _SEARCH.search(text) is not None


def read_fairseq_log(path: str | Path) -> RawLog:
    """Read a fairseq / metaseq stdout log (``--log-format json`` or ``simple``).

    Raises:
        LogReadError: A ``train_inner`` or ``valid`` line that does not parse (named by its number), or no
            ``train_inner`` line at all.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text('x | INFO | train_inner | {"loss": "9.5", "num_updates": "10", "gnorm": "4.2"}\\n')
        >>> list(read_fairseq_log(p).records)
        [(10, {'loss': 9.5, 'gnorm': 4.2})]
    """
    path = Path(path)
    entries = Entries()
    last_step: int | None = None
    overflows = other_lines = 0
    text = read_lines(path)
    for number, line in enumerate(text.lines, start=1):
        m = _TAGGED.search(line)
        if m is None:
            if _OVERFLOW.search(line):
                overflows += 1
            else:
                other_lines += bool(line.strip())
            continue
        tag, body = m.group(1), m.group(2).strip()
        fields = _json_fields(body, tag) if body.startswith("{") else _simple_fields(body, tag)
        if fields is None:
            if text.cut_off(number):
                break
            raise _malformed(path, number, line)
        step = fields.pop(STEP, None)
        if tag == "train_inner":
            if step is None:
                if text.cut_off(number):
                    break
                raise _malformed(path, number, line)
            last_step = step
        elif step is None:
            step = last_step  # an evaluation without its update count belongs to the interval logged last
        if step is None:
            other_lines += 1  # an evaluation before any training interval: no step to put it at
            continue
        add_entry(entries, step, fields)
    if last_step is None:
        raise LogReadError(f"{path}: no '| train_inner |' line (fairseq / metaseq, --log-format json or simple)")
    log = entries.log(path, fmt=FORMAT)
    text.note(log.notes)
    if overflows:
        log.notes.append(
            f"{overflows} mixed-precision overflow lines (skipped updates, not counted in num_updates) left out"
        )
    if other_lines:
        log.notes.append(f"{other_lines} lines that are not train_inner or valid lines left out")
    return log


def _json_fields(body: str, tag: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    prefix = "" if tag == "train_inner" else tag + "_"  # json names carry the subset: valid_loss
    return _named({k.removeprefix(prefix) if prefix and k.startswith(prefix) else k: v for k, v in obj.items()}, tag)


def _simple_fields(body: str, tag: str) -> dict[str, Any] | None:
    if tag == "train_inner":
        m = _SIMPLE_TRAIN.fullmatch(body)
        pairs = [p.partition("=") for p in m.group(1).split(",")] if m else None
    else:
        m = _SIMPLE_VALID.fullmatch(body)
        tag = "valid" if m and m.group(1) == "valid" else f"valid_{m.group(1)}" if m else tag
        pairs = [p.strip().partition(" ") for p in m.group(2).split("|") if p.strip()] if m else None
    if pairs is None or any(not sep or not name.strip() for name, sep, _ in pairs):
        return None
    return _named({name.strip(): value.strip() for name, _, value in pairs}, tag)


def _named(values: dict[str, Any], tag: str) -> dict[str, Any] | None:
    """Names as keel reads them (a ``valid`` subset's become ``val_*``), and the step as an int (None: absent)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name == STEP:
            try:
                out[STEP] = int(float(value))
            except (TypeError, ValueError, OverflowError):
                return None
            continue
        key = normalize(name)
        out[key if tag == "train_inner" else ("val_" if tag == "valid" else tag + "_") + key] = value
    return out


def _malformed(path: Path, number: int, line: str) -> LogReadError:
    return malformed_line(
        path,
        number,
        line,
        "is not a fairseq '| train_inner |' or '| valid |' line with num_updates (--log-format json or simple)",
    )
