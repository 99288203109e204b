"""Megatron-LM stdout logs (also Megatron-DeepSpeed, as BLOOM trained, and Megatron-based launchers).

Megatron prints one line per logging interval::

     iteration     6502/  159576 | consumed samples:       216960 | elapsed time per iteration (ms): 31074.1 |
     learning rate: 5.997E-05 | global batch size:    80 | lm loss: 3.876781E+00 | loss scale: 4096.0 |
     grad norm: 3246.595 | num zeros: 0.0 | number of skipped iterations:   0 | number of nan iterations:   0 |

(one line in the log), and at each evaluation ``validation loss at iteration 1000 | lm loss value: 3.9E+00 | lm
loss PPL: 49.4 |``. Launchers put something before ``iteration`` (``1: `` from srun, a timestamp, a rank tag): it is
skipped. Every other line (arguments, model building, memory reports) is not a metric line and is left out, counted
in a note. An ``iteration`` line whose step or fields do not parse is one error that names it.

Names are normalized as `keel.doctor.columns.normalize` does (``lm loss`` → ``lm_loss``, which maps to ``loss``;
``grad norm``, ``learning rate``, ``loss scale`` map to their keys); the validation ``lm loss value`` is
``val_loss``. A ``loss scale`` of 1.0 at every iteration (bf16) is left out by `keel.doctor.examine`, as in any log:
no scaler skips a NaN there.

nanotron (``src/nanotron/logging.py``, ``LoggerWriter.add_scalars_from_list``) prints the same shape with colons,
after its ``MM/DD HH:MM:SS [INFO|DP=0|PP=0|TP=0]: `` header (in ANSI colours)::

    iteration: 10 / 100 | consumed_tokens: 1.31M | elapsed_time_per_iteration_ms: 1.2K | lm_loss: 10.5 | lr: 0.0003 |
    model_tflops_per_gpu: 120 | grad_norm: 1.23

(one line; no ``|`` at the end), each value in its ``human_format``: 3 significant digits, and a suffix K, M, G,
T, P, E for thousands, millions … (``1.2K`` is read as 1200, so a gradient norm spike to 1,500 stays a number).
A value written as ``this/average`` (``13100.0/13240.9``, ROCm builds) keeps the first
number; a value with a unit (``153.81GB/...``) stays text and is reported as a text column, not guessed at.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from keel.doctor._text import read_lines
from keel.doctor.columns import MAX_REMEMBERED_NAME, normalize
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog, malformed_line
from keel.doctor.step_lines_log import NUMBER

FORMAT = "megatron"
_CANDIDATE = re.compile(r"\biteration:?\s+[^\s/|]+\s*/\s*[^\s|]+\s*\|")  # classes that cannot overlap: linear
_LINE = re.compile(r"\biteration:?\s+(\d+)\s*/\s*(\d+)\s*\|(.*)")
_VALIDATION = re.compile(r"\bvalidation loss at (?:the end of training for val data|iteration (\d+))\s*\|(.*)")
_LETTER = re.compile(r"[A-Za-z]")
_SPLIT_VALUE = re.compile(rf"({NUMBER})\s*/\s*{NUMBER}", re.IGNORECASE)
_SEARCH = re.compile(r"\biteration:?\s+\d+\s*/\s*\d+\s*\|[^|:\n]*:[^|\n]*\|")
# nanotron's human_format: a value of 1,000 or more is written with a suffix ("1.2K", "3.1M"), 3 digits kept
_SUFFIXED = re.compile(rf"({NUMBER})([KMGTPE])")
SUFFIXES = {letter: 1000.0 ** (i + 1) for i, letter in enumerate("KMGTPE")}
VAL_NAMES = {"lm_loss_value": "val_loss", "lm_loss_ppl": "val_ppl"}


def looks_like_megatron(text: str) -> bool:
    """Whether ``text`` holds a Megatron `` iteration N/ TOTAL | name: value |`` line (anywhere: a banner first)."""
    return _SEARCH.search(text) is not None


def read_megatron_log(path: str | Path) -> RawLog:
    """Read a Megatron-LM stdout log.

    Raises:
        LogReadError: An ``iteration`` line that is not ``iteration N/ TOTAL | name: value | ...`` (named by its
            number), or no such line at all.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "stdout.log"
        >>> _ = p.write_text("training ...\\n iteration 10/ 100 | lm loss: 9.5E+00 | grad norm: 4.2 |\\n")
        >>> list(read_megatron_log(p).records)
        [(10, {'lm_loss': 9.5, 'grad_norm': 4.2})]
    """
    path = Path(path)
    entries = Entries()
    last_step: int | None = None
    other_lines = 0
    text = read_lines(path)
    for number, line in enumerate(text.lines, start=1):
        if m := _VALIDATION.search(line):
            step = int(m.group(1)) if m.group(1) else last_step
            fields = _fields(m.group(2))
            if step is None or fields is None:
                if text.cut_off(number):
                    break
                raise _malformed(path, number, line)
            fields = {VAL_NAMES.get(name, "val_" + name): value for name, value in fields.items()}
        elif _CANDIDATE.search(line):
            m = _LINE.search(line)
            fields = _fields(m.group(3)) if m else None
            if m is None or fields is None:
                if text.cut_off(number):
                    break
                raise _malformed(path, number, line)
            step = last_step = int(m.group(1))
        else:
            other_lines += bool(line.strip())
            continue
        add_entry(entries, step, fields)  # a validation line joins the iteration just logged
    if not entries:
        raise LogReadError(f"{path}: no ' iteration N/ TOTAL | name: value |' line (Megatron-LM, nanotron)")
    log = entries.log(path, fmt=FORMAT)
    text.note(log.notes)
    if other_lines:
        log.notes.append(f"{other_lines} lines that are not iteration or validation lines left out")
    return log


def _fields(text: str) -> dict[str, str] | None:
    fields: dict[str, str] = {}
    for piece in text.split("|"):
        if not piece.strip():
            continue
        # partition, not one regex for name and value: two quantifiers over the same characters backtrack
        # quadratically on a long field without a colon
        name, colon, value = piece.partition(":")
        key = _key(name) if colon else None
        if key is None:
            return None
        value = value.strip()
        if "/" in value and (split := _SPLIT_VALUE.fullmatch(value)):
            value = split.group(1)
        elif value[-1:] in SUFFIXES and (suffixed := _SUFFIXED.fullmatch(value)):
            value = str(float(suffixed.group(1)) * SUFFIXES[suffixed.group(2)])
        fields[key] = value
    return fields


def _key(name: str) -> str | None:
    """A field's name normalized, None when it has no letter (``12 | 3: x``: no field); each name is looked at once
    (a console repeats its names on every line), up to a bounded number of them."""
    if len(name) > MAX_REMEMBERED_NAME:
        return normalize(name) if _LETTER.search(name) else None
    return _short_key(name)


@functools.lru_cache(maxsize=4096)
def _short_key(name: str) -> str | None:
    return normalize(name) if _LETTER.search(name) else None


def _malformed(path: Path, number: int, line: str) -> LogReadError:
    return malformed_line(path, number, line, "is not 'iteration N/ TOTAL | name: value | ...' (Megatron-LM)")
