"""torchtitan stdout logs (``torchrun ... torchtitan/train.py > train.log 2>&1``).

Every ``metrics.log_freq`` steps torchtitan's metrics processor prints one line, coloured by ANSI codes unless
``--metrics.disable_color_printing``::

    [rank0]:[titan] 2025-03-01 10:00:01,123 - root - INFO - step: 10  loss:  7.8562  grad_norm:  1.2345
    memory: 12.34GiB(15.61%)  tps: 8,123  tflops: 123.45  mfu: 12.50%

(one line in the log; versions before 2025 have no ``grad_norm``, older ones print ``wps:`` for ``tps:``, forks add
``lr:``), and, with validation on, ``validate step: 10  loss:  7.1234  memory: ...  tps: ...``. The colour codes and
the launcher's prefix are skipped; thousands commas are dropped (``8,123`` → 8123); a unit joins its name
(``memory_gib``, ``mfu_percent``; ``12.34GiB(15.61%)`` also gives ``memory_percent``); names are lower-cased (a
fork's ``memory/max_active(GiB): 12.3`` is ``memory/max_active(gib)``); ``N/A`` (no MFU for the device) is left
out. ``loss`` is the training loss at that step; a ``validate`` line's fields are ``val_*`` (``val_loss``). torchrun
writes each rank's lines with a ``[rankN]:`` tag: the first rank that prints a step line is read and the others'
are counted in a note (every rank prints the same global loss); without tags, a line with the step and loss of the
line of its kind before it is another rank's copy, counted too. Every other line (the banner, the config,
checkpoint and GC messages) is left out, counted in a note. A line with ``step: N  loss:`` whose fields do not
parse is one error that names it.
"""

from __future__ import annotations

import re
from pathlib import Path

from keel.doctor._text import read_lines, strip_ansi
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog, malformed_line

FORMAT = "torchtitan"
_NUMBER = r"[-+]?(?:\d[\d,]{0,30}(?:\.\d{0,30})?(?:[eE][-+]?\d{1,4})?|\.\d{1,30}|nan|inf)"
# every quantifier bounded: a 100,000-character line is read in linear time
_CANDIDATE = re.compile(r"(?:^|(?<=[\s\]:-]))(validate )?step:[ \t]{1,20}(\d{1,18})[ \t]{1,20}(?=loss:)")
_SEARCH = re.compile(rf"(?:^|(?<=[\s\]:-]))step:[ \t]{{1,20}}\d{{1,18}}[ \t]{{1,20}}loss:[ \t]{{0,20}}{_NUMBER}", re.M)
_FIELD = re.compile(
    rf"[ \t]*([A-Za-z_][\w/()%]{{0,63}}):[ \t]{{0,20}}(?:({_NUMBER})([A-Za-z]{{1,8}}|%)?(?:\(({_NUMBER})%\))?|(N/A))",
    re.IGNORECASE,
)
_RANK = re.compile(r"\[(?:rank|default)(\d{1,6})\]:")  # torchrun's tag, --tee's tag
UNITS = {"%": "percent"}


def looks_like_torchtitan(text: str) -> bool:
    """Whether ``text`` holds a torchtitan ``step: N  loss: X`` line (colour codes and all)."""
    if "step:" not in text:  # a fast answer for the JSON and CSV logs that detection tries this on
        return False
    return _SEARCH.search(strip_ansi(text)) is not None


def read_torchtitan_log(path: str | Path) -> RawLog:
    """Read torchtitan's stdout log.

    Raises:
        LogReadError: A ``step: N  loss: X ...`` line whose fields do not parse (named by its number), or no such
            line at all.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> line = "[titan] 2025-03-01 10:00:01,123 - root - INFO - step: 10  loss:  7.8562  tps: 8,123  mfu: 12.50%"
        >>> _ = p.write_text("Starting job\\n" + line + "\\n")
        >>> list(read_torchtitan_log(p).records)
        [(10, {'loss': 7.8562, 'tps': 8123.0, 'mfu_percent': 12.5})]
    """
    path = Path(path)
    entries = Entries()
    rank: str | None = None
    last_kept: dict[str, tuple[int, float | str | None]] = {}  # "step"/"validate" → (step, loss) of its last line
    other_lines = other_ranks = copies = 0
    text = read_lines(path)
    for number, line in enumerate(text.lines, start=1):  # colours are gone: `read_lines` leaves escapes out
        m = _CANDIDATE.search(line)
        if m is None:
            other_lines += bool(line.strip())
            continue
        tag = _RANK.search(line, 0, m.start())  # after srun's "0: " too
        line_rank = tag.group(1) if tag else None
        if rank is None and not entries:
            rank = line_rank
        if line_rank != rank:
            other_ranks += 1
            continue
        fields = _fields(line[m.end() :])
        if fields is None:
            if text.cut_off(number):
                break
            raise _malformed(path, number, line)
        kind, step = m.group(1) or "step", int(m.group(2))
        if last_kept.get(kind) == (step, fields.get("loss")):
            copies += 1  # untagged ranks print the same step and global loss in turn
            continue
        last_kept[kind] = (step, fields.get("loss"))
        if m.group(1):
            fields = {"val_" + name: value for name, value in fields.items()}
        add_entry(entries, step, fields)  # a validate line joins the step line of its step
    if not entries:
        raise LogReadError(f"{path}: no 'step: N  loss: X' line (torchtitan)")
    log = entries.log(path, fmt=FORMAT)
    text.note(log.notes)
    if other_ranks:
        log.notes.append(f"{other_ranks} step lines of other ranks than [rank{rank}] left out (the same global loss)")
    if copies:
        log.notes.append(
            f"{copies} step lines that repeat the step and loss of the line before (other ranks, untagged) left out"
        )
    if other_lines:
        log.notes.append(f"{other_lines} lines that are not step or validate lines left out")
    return log


def _fields(text: str) -> dict[str, float | str] | None:
    """``name: value`` fields up to the end of the line; None when anything else is left."""
    fields: dict[str, float | str] = {}
    position, end = 0, len(text.rstrip())
    while position < end:
        m = _FIELD.match(text, position)
        if m is None:
            return None
        name, value, unit, percent, not_available = m.groups()
        position = m.end()
        if not_available:
            continue
        name = name.lower()
        fields[f"{name}_{UNITS.get(unit, unit.lower())}" if unit else name] = value.replace(",", "")
        if percent is not None:  # memory: 12.34GiB(15.61%)
            fields[f"{name}_percent"] = percent
    return fields


def _malformed(path: Path, number: int, line: str) -> LogReadError:
    return malformed_line(path, number, line, "is not 'step: N  loss: X  name: value ...' (torchtitan metrics line)")
