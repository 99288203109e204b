"""MosaicML Composer's console log (its ``ConsoleLogger``; llm-foundry's ``train.py`` output).

Every logged batch is a header, then one ``Train name: value`` line per metric, each indented by a tab and a space::

    [epoch=1][batch=5/100]:
             Train time/batch: 4
             Train loss/train/total: 8.4213
             Train l2_norm/grad/global: 1.2345
             Train lr-DecoupledAdamW/group0: 0.0006

(``[batch=N/TOTAL]:`` when the run's duration is in batches, ``[token=N/TOTAL]:`` in tokens). An evaluation ends
with ``[Eval batch=10/10] Eval on eval data:`` and its ``Eval metrics/eval/...: value`` lines: they belong to the
batch logged last, named ``eval/...``; the eval progress lines without metrics are left out. A block's step is its
``time/batch`` + 1 (the batches done before it, counted across epochs) when it has one, else the header's batch
under a duration in batches, else the block's place in the log (said in a note). A value that is not a number (a
wandb image's repr) is left out, as are the config dump and every other line, counted in a note. ``srun``'s ``0:``
prefix is skipped. ``keel.doctor.columns`` maps ``loss/train/total``, ``l2_norm/grad/global`` and ``lr-<Optimizer>/
group0`` to keel's loss, gradient norm and learning rate.
"""

from __future__ import annotations

import re
from pathlib import Path

from keel._core import keys
from keel.doctor._text import read_lines
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog, parse_number, parse_step

FORMAT = "composer"
_PREFIX = r"(?:\d{1,6}:[ \t]{0,20})?"  # srun's rank prefix
_HEADER = re.compile(
    rf"{_PREFIX}(?:\[epoch=\d{{1,18}}\])?\[(batch|token|sample|iteration|epoch)=(\d{{1,18}})(?:/\d{{1,18}})?\]:[ \t]*$"
)
_EVAL_HEADER = re.compile(rf"{_PREFIX}\[Eval batch=\d{{1,18}}/\d{{1,18}}\] Eval on [^\n]{{0,200}}:[ \t]*$")
_METRIC = re.compile(rf"{_PREFIX}[ \t]{{1,40}}(Train|Eval) ([^\n]{{1,300}}?): ([^\n]{{0,2000}})$")
_SEARCH = re.compile(
    r"\[(?:batch|token|sample|iteration|epoch)=\d{1,18}(?:/\d{1,18})?\]:[ \t]*\r?\n"
    rf"{_PREFIX}[ \t]{{1,40}}Train [^\n:]{{1,300}}: "
)
BATCHES = "time/batch"


def looks_like_composer(text: str) -> bool:
    """Whether ``text`` holds a Composer ``[batch=N/TOTAL]:`` header followed by a ``Train name: value`` line."""
    if "Train " not in text:  # a fast answer for the logs that detection tries this on
        return False
    return _SEARCH.search(text) is not None


def read_composer_log(path: str | Path) -> RawLog:
    """Read Composer's console log.

    Raises:
        LogReadError: No ``[batch=N/TOTAL]:`` block with a ``Train`` metric in it.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("[batch=1/100]:\\n\\t Train loss/train/total: 10.9736\\n")
        >>> list(read_composer_log(p).records)
        [(1, {'loss/train/total': 10.9736})]
    """
    path = Path(path)
    entries = Entries()
    block: dict[str, float | str] | None = None
    unit = header_step = None
    numbered = other_lines = text_values = 0

    def close() -> None:
        nonlocal numbered
        if not block:
            return
        if unit is None:  # an evaluation's metrics join the batch logged before them
            if entries:
                add_entry(entries, int(entries[-1]["step"]), block)
            return
        step = parse_step(block.get(BATCHES))
        if step is not None:
            step += 1
        elif unit == "batch":
            step = header_step
        else:
            step = int(entries[-1]["step"]) + 1 if entries else 1
            numbered += 1
        add_entry(entries, int(step), block)  # type: ignore[arg-type]

    for raw in read_lines(path).lines:
        line = raw.rstrip()
        if m := _HEADER.fullmatch(line):
            close()
            block, unit, header_step = {}, m.group(1), int(m.group(2))
        elif _EVAL_HEADER.fullmatch(line):
            close()
            block, unit = {}, None
        elif block is not None and (m := _METRIC.fullmatch(line)):
            kind, name, value = m.groups()
            if parse_number(value) is None:
                text_values += 1
                continue
            block[name if kind == "Train" else keys.EVAL_PER_NAME + name] = value.strip()
        else:
            close()
            block = None
            other_lines += bool(line.strip()) and "Eval batch=" not in line
    close()
    if not entries:
        raise LogReadError(f"{path}: no '[batch=N/TOTAL]:' block of 'Train name: value' lines (Composer)")
    log = entries.log(path, fmt=FORMAT)
    if numbered:
        log.notes.append(
            f"{numbered} blocks without time/batch under a duration not in batches: numbered in order from the one "
            "before"
        )
    if text_values:
        log.notes.append(f"{text_values} metric lines whose value is not a number left out")
    if other_lines:
        log.notes.append(f"{other_lines} lines that are not metric blocks left out (banner, config, progress)")
    return log
