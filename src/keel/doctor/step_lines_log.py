"""karpathy-style text logs: one metric per line, as build-nanogpt's ``log.txt`` and llm.c's ``main.log`` write.

build-nanogpt: ``STEP NAME VALUE`` (``0 val 5.5036``, ``0 train 5.502185``, ``250 hella 0.2871``). llm.c:
``s:STEP NAME:VALUE ...`` (``s:0 trl:11.0100``, ``s:0 tel:11.0098``, ``s:1 trl:10.98 lr:0.000006 norm:15.31``;
a value may carry a time unit, ``train_time:1234ms``; modded-nanogpt's ``step:N/TOTAL`` logs are `speedrun_log`'s).
``train``/``trl`` is the training loss, ``val``/``tel`` the validation
loss, ``norm`` the gradient norm; a value's time unit joins its name (``train_time_ms``); any other name keeps
its own. Lines of one step that follow each other
make one record (build-nanogpt writes ``val``, ``hella`` and ``train`` of a step in turn), so a step number
that comes back later is a restart, as in every other log. A line that fits neither shape is one error that
names it: guessing at a free-text log would turn prose into a series.
"""

from __future__ import annotations

import re
from pathlib import Path

from keel.doctor._text import read_lines, strip_ansi
from keel.doctor.jsonl_log import records_from_objects
from keel.doctor.log import LogReadError, RawLog, malformed_line

FORMAT = "karpathy_text"
# the names these programs use -> the column names `keel.doctor.columns` maps to keel keys (llm.c's logger.h writes
# "s:%d trl:%.4f lr:%.6f norm:%.2f", its norm being the gradient norm)
RENAMED = {"train": "train_loss", "trl": "train_loss", "val": "val_loss", "tel": "val_loss", "norm": "grad_norm"}
NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf|infinity)"
_NANOGPT = re.compile(rf"(\d+)[ \t]+([A-Za-z_][\w/.-]*)[ \t]+({NUMBER})", re.IGNORECASE)
_LLMC = re.compile(r"s:(\d+)((?:[ \t]+[A-Za-z_][\w/.-]*:\S+)+)")
# NAME:VALUE with an optional time unit ("train_time:1234ms"), kept in the name; also read by speedrun_log
NAME_VALUE = re.compile(rf"([A-Za-z_][\w/.-]*):({NUMBER})(ms|us|ns|s|min|h)?", re.IGNORECASE)


LOG_NAMES = ("log.txt", "main.log")  # build-nanogpt's log/log.txt, llm.c's -o folder's main.log


def find_step_lines(folder: Path) -> Path | None:
    """``folder/log.txt`` or ``folder/main.log`` when its first line is a step line; None otherwise."""
    for name in LOG_NAMES:
        candidate = folder / name
        if candidate.is_file():
            with candidate.open("rb") as fh:
                head = fh.read(4096).decode("utf-8", "replace").lstrip()
            if looks_like_step_lines(strip_ansi(head).partition("\n")[0]):
                return candidate
    return None


def looks_like_step_lines(first_line: str) -> bool:
    """Whether a file's first non-empty line is a build-nanogpt or llm.c metric line."""
    line = first_line.strip()
    return bool(_NANOGPT.fullmatch(line) or _LLMC.fullmatch(line))


def read_step_lines_log(path: str | Path) -> RawLog:
    """Read a build-nanogpt ``log.txt`` or an llm.c ``main.log``.

    Raises:
        LogReadError: A line that is neither ``STEP NAME VALUE`` nor ``s:STEP NAME:VALUE ...`` (named by its
            number), or no line at all.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.txt"
        >>> _ = p.write_text("0 val 5.50\\n0 train 5.49\\n1 train 5.31\\n")
        >>> list(read_step_lines_log(p).records)
        [(0, {'val_loss': 5.5, 'train_loss': 5.49}), (1, {'train_loss': 5.31})]
    """
    path = Path(path)
    if path.is_dir():
        found = find_step_lines(path)
        if found is None:
            raise LogReadError(f"{path}: no {' or '.join(LOG_NAMES)} with step lines in this folder")
        path = found
    entries: list[dict[str, float | str]] = []
    text = read_lines(path)
    for number, raw in enumerate(text.lines, start=1):
        line = raw.strip()
        if not line:
            continue
        step, pairs = _parse(line)
        if pairs is None:
            if text.cut_off(number):
                break
            raise malformed_line(
                path, number, line, "is neither 'STEP NAME VALUE' (build-nanogpt) nor 's:STEP NAME:VALUE' (llm.c)"
            )
        values = {RENAMED.get(name, name): value for name, value in pairs}
        if entries and entries[-1]["step"] == step and not values.keys() & entries[-1].keys():
            entries[-1].update(values)
        else:
            entries.append({"step": step, **values})
    if not entries:
        raise LogReadError(f"{path}: no metric lines")
    log = records_from_objects(path, entries, fmt=FORMAT)
    text.note(log.notes)
    return log


def _parse(line: str) -> tuple[int, list[tuple[str, str]] | None]:
    if m := _NANOGPT.fullmatch(line):
        return int(m.group(1)), [(m.group(2), m.group(3))]
    if m := _LLMC.fullmatch(line):
        pairs = [NAME_VALUE.fullmatch(token) for token in m.group(2).split()]
        if all(pairs):
            return int(m.group(1)), [(with_unit(p.group(1), p.group(3)), p.group(2)) for p in pairs if p]
    return -1, None


def with_unit(name: str, unit: str | None) -> str:
    """``train_time`` with unit ``ms`` is ``train_time_ms``: the unit stays with the name, not lost."""
    return f"{name}_{unit.lower()}" if unit else name
