"""karpathy/nanoGPT ``train.py``'s console output saved to a file (``python train.py config/... > train.log``).

After a banner (``tokens per iteration will be: 16,384``, ``number of parameters: 10.65M`` ...) it prints, every
``log_interval`` iterations, ``iter 250: loss 1.7424, time 88.01ms, mfu 4.23%`` (the loss of the iteration's last
micro-batch, times the accumulation steps) and, every ``eval_interval``, ``step 250: train loss 1.6573, val loss
1.8194`` (both estimated over ``eval_iters`` batches). ``loss`` is the training loss; ``val loss`` is ``val_loss``;
the eval-time ``train loss`` is ``train_eval_loss`` (an estimate, not the step's loss, so kept apart); a unit joins
its name (``time_ms``, ``mfu_percent``; forks add ``cuda memory 0.499G`` → ``cuda_memory_g``, ``lr:0.0003``).
Lines that begin with neither ``iter N:`` nor ``step N:`` (the banner, ``saving checkpoint to ...``) are left out,
counted in a note; one that begins so but does not parse is one error that names it.
"""

from __future__ import annotations

import re
from pathlib import Path

from keel.doctor._text import read_lines
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog, malformed_line
from keel.doctor.step_lines_log import NUMBER

FORMAT = "nanogpt_stdout"
_CANDIDATE = re.compile(r"(?:iter|step) ")
_LINE = re.compile(r"(iter|step) (\d+): (.*)")
_NAME = re.compile(r"[A-Za-z]+(?: +[A-Za-z]+)*")
_VALUE = re.compile(rf"({NUMBER})([A-Za-z]+|%)?", re.IGNORECASE)
_SEARCH = re.compile(rf"^iter \d+: loss {NUMBER}", re.MULTILINE | re.IGNORECASE)
NAMES = {"train loss": "train_eval_loss", "val loss": "val_loss"}  # of a "step N:" evaluation line
UNITS = {"%": "percent"}


def looks_like_nanogpt(text: str) -> bool:
    """Whether ``text`` holds an ``iter N: loss X`` line at the start of a line (after a banner)."""
    return _SEARCH.search(text) is not None


def read_nanogpt_log(path: str | Path) -> RawLog:
    """Read nanoGPT ``train.py``'s saved console output.

    Raises:
        LogReadError: A line that begins with ``iter N`` or ``step N`` but is not ``iter N: name value, ...``
            (named by its number), or no ``iter N: loss X`` line at all.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("number of parameters: 10.65M\\niter 0: loss 4.2649, time 88.01ms, mfu 4.23%\\n")
        >>> list(read_nanogpt_log(p).records)
        [(0, {'loss': 4.2649, 'time_ms': 88.01, 'mfu_percent': 4.23})]
    """
    path = Path(path)
    entries = Entries()
    has_loss = False
    other_lines = 0
    text = read_lines(path)
    for number, line in enumerate(text.lines, start=1):
        if not _CANDIDATE.match(line):
            other_lines += bool(line.strip())
            continue
        m = _LINE.fullmatch(line.rstrip())
        fields = _fields(m.group(3), evaluation=m.group(1) == "step") if m else None
        if m is None or fields is None:
            if text.cut_off(number):
                break
            raise malformed_line(
                path,
                number,
                line,
                "is not 'iter N: loss X, time Tms, mfu M%' nor 'step N: train loss X, val loss Y' (nanoGPT train.py)",
            )
        step = int(m.group(2))
        add_entry(entries, step, fields)  # "step N:" evaluation, then "iter N:" of the same iteration
        has_loss = has_loss or "loss" in fields
    if not has_loss:
        raise LogReadError(f"{path}: no 'iter N: loss X' line at the start of a line (nanoGPT train.py)")
    log = entries.log(path, fmt=FORMAT)
    text.note(log.notes)
    if other_lines:
        log.notes.append(f"{other_lines} lines that are not iter or step lines (the banner, checkpoints) left out")
    return log


def _fields(text: str, *, evaluation: bool) -> dict[str, float | str] | None:
    fields: dict[str, float | str] = {}
    for piece in text.split(","):
        # "name: value" or "name value" split by hand, not by one regex: a lazy name with spaces before a run of
        # spaces backtracks for minutes on a long hostile line
        piece = piece.strip()
        name, _, raw = piece.partition(":") if ":" in piece else piece.rpartition(" ")
        m, v = _NAME.fullmatch(name.strip()), _VALUE.fullmatch(raw.strip())
        if m is None or v is None:
            return None
        name, unit = " ".join(m.group(0).lower().split()), v.group(2)
        if evaluation:
            name = NAMES.get(name, name)
        name = name.replace(" ", "_")
        if unit:
            name = f"{name}_{UNITS.get(unit, unit.lower())}"
        fields[name] = v.group(1)
    return fields
