"""The Hugging Face Trainer's console output saved to a file (``python train.py 2>&1 | tee train.log``; TRL's
trainers print the same).

Every ``logging_steps`` the Trainer prints its logs as a Python dict, through tqdm's progress bar (``\\r``-separated
bar redraws around it) or, with ``disable_tqdm``, on a line of its own::

    {'loss': 2.3456, 'grad_norm': 1.23, 'learning_rate': 5e-05, 'epoch': 0.01}

(transformers 5 prints each float as a string of 4 significant digits: ``{'loss': '2.346', ...}``; a NaN loss is
``nan`` or ``'nan'``; a value logged as a tensor prints ``tensor(1.23, device='cuda:0')``). A launcher's ``0: `` or
``[rank0]:`` before a dict is skipped. A dict with ``eval_*`` names (and no loss) is an evaluation (``eval_loss`` is
the validation loss): its ``eval_*`` values join the training entry printed before it. The final
``{'train_runtime': ...}`` summary is left out, counted in a note; so are DeepSpeed's loss-scaler overflow lines
(``[deepscale] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 262144, reducing to 131072.0``, a fp16 run under
the Trainer's DeepSpeed integration), in a note of their own that says how the scale went
(`keel.doctor.deepspeed_log.ScalerOverflows`).

These lines carry no step. When every training dict is followed by the progress bar's redraw (``12/200 [...]``),
as in a terminal capture or ``2>&1`` into a file, and those counts are evenly spaced (every ``logging_steps``), they
are the steps (a run resumed from a checkpoint into the same file, ``tee -a``, starts the count again: each
stretch is read so, and the doctor lists the restart); a launcher that forwards whole lines (srun) may show a later
count, and uneven counts are not used.
Otherwise (no bar, ``disable_tqdm``, uneven counts) the training entries are numbered 1..N in order, and a note
says so: the steps are then log intervals, not optimizer steps. Dicts are read with `ast.literal_eval`, never
evaluated. A line that begins with ``{'`` but is not such a dict is one error that names it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keel.doctor._text import read_lines
from keel.doctor.deepspeed_log import ScalerOverflows, is_overflow_line
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog, malformed_line

FORMAT = "hf_console"
_DICT_START = "{'"
# srun's "0: ", torchrun's "[rank0]:" / --tee's "[default0]:" before a dict
_LAUNCHER = r"(?:\d{1,6}: ?|\[(?:rank|default)\d{1,6}\]: ?)"
# a dict line with the Trainer's epoch in it; bounded: each candidate line start is scanned at most 4,000 characters
# (or right after a progress bar's "]": buffered stdout glues the dict onto the bar before it)
_SEARCH = re.compile(rf"(?:^|\r|(?:it/s|s/it)\])[ \t]{{0,8}}{_LAUNCHER}?\{{'[^\n\r]{{0,4000}}?'epoch': ", re.MULTILINE)
_LAUNCHER_PREFIX = re.compile(_LAUNCHER + r"(?=\{')")
_BAR = re.compile(r"\|[ \t]{0,10}(\d{1,12})/(\d{1,12})[ \t]{0,3}\[")
# Python's repr of a float that literal_eval does not read, and a tensor's repr: as strings / their number
_BARE_FLOAT = re.compile(r"(?<=: )(-?(?:nan|inf))(?=[,}])")
_TENSOR = re.compile(
    r"tensor\(([-+]?(?:[\d.]{1,40}(?:e[-+]?\d{1,4})?|nan|inf))(?:, ?(?:device|dtype)=[\w.:'\"]{1,40}){0,2}\)"
)
SUMMARY = "train_runtime"
STEP_NAMES = ("logged_step", "global_step")  # a dict's own step ('step' read as logged_step), when a callback logs it
EVAL_PREFIXES = ("eval_", "test_", "predict_")
TRAINING_NAMES = frozenset({"loss", "grad_norm", "learning_rate"})


def looks_like_hf_console(text: str) -> bool:
    """Whether ``text`` holds a line (or a ``\\r`` segment) that is a Python dict with the Trainer's ``'epoch'``."""
    return _DICT_START in text and _SEARCH.search(text) is not None  # the first test: fast on a JSON log


def read_hf_console_log(path: str | Path) -> RawLog:
    """Read the Trainer's saved console output.

    Raises:
        LogReadError: A segment that begins with ``{'`` but is not a dict of names to numbers or strings (named by
            its line), or no training dict at all.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("{'loss': 2.5, 'epoch': 0.1}\\n{'loss': '2.4', 'epoch': '0.2'}\\n")
        >>> list(read_hf_console_log(p).records)
        [(1, {'loss': 2.5, 'epoch': 0.1}), (2, {'loss': 2.4, 'epoch': 0.2})]
    """
    path = Path(path)
    training: list[list[dict[str, Any]]] = []  # each training dict, then the evaluations printed after it
    bar_counts: list[tuple[int, int] | None] = []  # the bar's (count, total) redrawn right after each training dict
    awaiting_bar = False
    summaries = other_lines = 0
    scaler = ScalerOverflows()  # DeepSpeed's (fp16 under the Trainer's DeepSpeed integration)
    text = read_lines(path, at_newlines_only=True)
    for number, line in enumerate(text.lines, start=1):
        for segment in _segments(line):
            if not segment.startswith(_DICT_START):
                bar = _BAR.search(segment)
                if bar is None and is_overflow_line(segment):
                    scaler.add(segment)
                elif bar is None:
                    other_lines += 1
                elif awaiting_bar:
                    bar_counts[-1] = (int(bar.group(1)), int(bar.group(2)))
                awaiting_bar = False
                continue
            awaiting_bar = False
            logs = _literal(segment)
            if logs is None:
                if text.cut_off(number):
                    break
                raise _malformed(path, number, segment)
            kind = _kind(logs)
            if kind == "training":
                training.append([logs])
                bar_counts.append(None)
                awaiting_bar = True
            elif kind == "evaluation" and training:  # its epoch and a callback's extras are the training entry's
                training[-1].append({name: v for name, v in logs.items() if name.startswith(EVAL_PREFIXES)})
            elif kind == "summary":
                summaries += 1
            else:  # an evaluation before any training dict (no entry to join), or a dict that is not the Trainer's
                other_lines += 1
    if not training:
        raise LogReadError(
            f"{path}: no Trainer log dict ('{{'loss': ..., 'epoch': ...}}' lines, the HF Trainer's console)"
        )
    steps, note = _own_steps(training) or _steps(bar_counts)
    entries = Entries()
    for step, dicts in zip(steps, training, strict=True):
        for logs in dicts:
            add_entry(entries, step, logs)  # an evaluation joins the training entry before it
    log = entries.log(path, fmt=FORMAT)
    text.note(log.notes)
    log.notes.append(note)
    if summaries:
        log.notes.append(f"{summaries} end-of-training summary dict(s) ('train_runtime', ...) left out")
    if overflows := scaler.note():
        log.notes.append(f"{overflows} left out")
    if other_lines:
        log.notes.append(
            f"{other_lines} lines that are not Trainer log dicts nor progress bars (or an evaluation before the first "
            "training dict) left out"
        )
    return log


def _segments(line: str) -> Iterator[str]:
    """A line's ``\\r``-separated pieces (tqdm's cursor codes are gone: `read_lines`), a launcher's prefix skipped; a
    dict glued to the bar before it (stdout's buffer flushed right after stderr's bar) is a piece of its own."""
    for part in line.split("\r"):
        part = part.strip()
        if launcher := _LAUNCHER_PREFIX.match(part):
            part = part[launcher.end() :]
        head, glue, tail = part.partition("]" + _DICT_START)
        if glue and not head.startswith(_DICT_START) and _BAR.search(head):
            yield head + "]"
            yield _DICT_START + tail
        elif part:
            yield part


def _literal(segment: str) -> dict[str, Any] | None:
    """The dict a segment prints (read by `ast.literal_eval`), or None when it is not a dict of str keys."""
    if not segment.endswith("}"):
        return None
    value = _literal_eval(segment)
    if value is None:  # Python's repr of nan/inf and of a tensor are no literals: as strings / their number
        value = _literal_eval(_BARE_FLOAT.sub(r"'\1'", _TENSOR.sub(r"\1", segment)))
    if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
        return None
    if "step" in value:  # not the Trainer's; kept apart from the step this reader gives the entry
        value["logged_step"] = value.pop("step")
    return value


def _literal_eval(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _kind(logs: dict[str, Any]) -> str:
    """``summary``, ``training`` (a loss, gradient norm or learning rate), ``evaluation`` (``eval_*`` names and
    nothing of training's: a callback may add its own, ``'elapsed'``), or ``other``."""
    if SUMMARY in logs:
        return "summary"
    if TRAINING_NAMES & logs.keys():
        return "training"
    if any(name.startswith(EVAL_PREFIXES) for name in logs):
        return "evaluation"
    return "training" if "epoch" in logs else "other"


def _own_steps(training: list[list[dict[str, Any]]]) -> tuple[list[int], str] | None:
    """The dicts' own step (a callback or a custom Trainer that logs ``'step'``, read as ``logged_step``, or
    ``'global_step'``), when every training dict has one that is a whole number; else None. It is taken out of the
    dicts."""
    steps = []
    for logs in training:
        name = next((n for n in STEP_NAMES if n in logs[0]), None)
        value = _whole(logs[0].get(name)) if name is not None else None
        if value is None:
            return None
        steps.append(value)
    for logs in training:
        for name in STEP_NAMES:
            logs[0].pop(name, None)
    return steps, "steps are the Trainer log dicts' own step values"


def _whole(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and abs(number) < 2**53 else None


def _steps(bar_counts: list[tuple[int, int] | None]) -> tuple[list[int], str]:
    """The progress bar's counts when every training dict has one and they are the logged steps (`_bar_steps`); else
    1..N. And a note that says which."""
    bars = [bar for bar in bar_counts if bar is not None]
    counts = [count for count, _ in bars]
    if len(bars) == len(bar_counts) and (note := _bar_steps(bars)) is not None:
        return counts, note
    numbered = (
        f"its {len(bar_counts)} training log dicts are numbered 1..N in order (log intervals, not optimizer steps; "
        "trainer_state.json has the steps)"
    )
    if not counts:
        return list(range(1, len(bar_counts) + 1)), f"the Trainer's console output has no step: {numbered}"
    return list(range(1, len(bar_counts) + 1)), (
        "the progress bar's counts after the Trainer's log dicts are not the logged steps (missing, of another bar "
        f"or not evenly spaced: stdout buffered apart from stderr?): {numbered}"
    )


def _bar_steps(bars: list[tuple[int, int]]) -> str | None:
    """The note for bar counts that are the logged steps, or None when they are not.

    The counts are cut into stretches where one is not above the one before (a run killed and resumed from a
    checkpoint, its console appended to the same file: the resumed bar starts again at the checkpoint's step). Each
    stretch is of one bar (one total) and evenly spaced (the Trainer logs every ``logging_steps``, and at step 1 with
    ``logging_first_step``). When the count goes back, every stretch must have the same spacing and every count be a
    multiple of it (the Trainer logs at ``global_step % logging_steps == 0``), or counts that merely jump about (a
    buffered stdout's stale bars) would pass as restarts."""
    stretches: list[list[tuple[int, int]]] = [[bars[0]]]
    for before, bar in zip(bars, bars[1:], strict=False):
        if bar[0] > before[0]:
            stretches[-1].append(bar)
        else:
            stretches.append([bar])
    gaps: set[int] = set()
    for stretch in stretches:
        if len({total for _, total in stretch}) > 1:
            return None
        counts = [count for count, _ in stretch]
        spaced = counts[1:] if counts[:1] == [1] and len(counts) > 2 else counts
        gaps |= {b - a for a, b in zip(spaced, spaced[1:], strict=False)}
    note = "steps are the progress bar's count redrawn after each Trainer log dict"
    if len(stretches) == 1:
        return note if len(gaps) <= 1 else None
    if len(gaps) != 1 or any(count % next(iter(gaps)) for count, _ in bars if count != 1):
        return None
    return f"{note}; it goes back {len(stretches) - 1} time(s): a run resumed with its console appended to the file"


def _malformed(path: Path, number: int, segment: str) -> LogReadError:
    return malformed_line(
        path, number, segment, "begins with {' but is not a Python dict of names to values (the HF Trainer's log line)"
    )
