"""DeepSpeed's own console lines: the pipeline engine's ``steps: N loss: X ...`` line, saved from stdout.

DeepSpeed's ``PipelineEngine.train_batch`` (``deepspeed/runtime/pipe/engine.py``) prints, every
``steps_per_print`` steps on global rank 0::

    steps: 2499 loss: 13.4013 iter time (s): 1.202 samples/sec: 26.614

(newer releases put each additional loss, ``name: value``, before ``iter time``; forks print
``step:  2499 /  5000 loss: ...`` and an ``eta:``). Whatever comes before ``steps:`` on a line (a launcher's rank
tag, ``[^^]``) is left out.

Two more of DeepSpeed's lines tell a fp16 run's loss-scale story, and are read into the step they belong to:

- the engine's ``_report_progress`` (``deepspeed/runtime/engine.py``), printed in the same step as its ``steps:``
  line, before it: ``[Rank 0] step=2499, skipped=3, lr=[0.0001, 0.0001], mom=[(0.9, 0.95), (0.9, 0.95)]`` — its
  learning rates are ``lr`` (group 0), ``lr/1`` … and ``skipped`` (the steps the loss scaler skipped so far,
  counted by the engine) is ``skipped_steps``; the betas are left out;
- the loss scaler's overflow, one line per skipped step, printed inside the step it skipped, before that step's
  report: ``[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 65536, reducing to 32768.0``
  (``loss_scaler.py``; older ``[deepscale] OVERFLOW!``, the fp16 optimizers' ``Overflow detected. Skipping step.``
  and ``fp16 dynamic loss scale overflow! Skipping step.``; ``…but hysteresis is 2. Reducing hysteresis to 1``
  keeps the scale). The overflows since the step line before are ``loss_scale_overflows`` of the next step line,
  and the scale they left ``loss_scale_after_overflow`` (a report comes every ``steps_per_print`` steps: which
  step in between skipped is not told). A note sums them up: how many, and the scale's first and last value.

Neither is a keel signal (a loss scale seen only when it falls is no ``amp/scale`` series: the thrash detector
would read a scale that never grows back); they are the log's own columns, in the report and ``--json``. Every
other line is left out and counted in a note.
A Megatron-DeepSpeed log holds Megatron's ``iteration`` lines too: it is read as Megatron's
(`keel.doctor.megatron_log`), which it is detected as first.
"""

from __future__ import annotations

import re
from pathlib import Path

from keel.doctor._text import read_lines
from keel.doctor.columns import normalize
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog

FORMAT = "deepspeed"
_HEAD = r"steps?:[ \t]{0,40}(\d{1,18})(?:[ \t]{0,40}/[ \t]{0,40}\d{1,18})?[ \t]{1,40}"
_STEP = re.compile(rf"(?:^|(?<=[\s\]>])){_HEAD}(?=loss:)")
_SEARCH = re.compile(rf"(?:^|[\s\]>]){_HEAD}loss:[ \t]{{0,40}}[-+.\w]", re.MULTILINE)  # bounded: linear
# the engine's report: "step=N, skipped=K, lr=[a, b], mom=[...]" (bounded: linear on any text)
_REPORT = re.compile(
    r"(?:^|(?<=[\s\]>]))step=(\d{1,18}),[ \t]{0,40}skipped=(\d{1,18}),[ \t]{0,40}lr=\[([^\]]{0,4000})\]"
)
# the loss scaler's overflow: "OVERFLOW! Rank 0 Skipping step.", "Overflow detected. Skipping step.", "fp16 dynamic
# loss scale overflow! Skipping step.", then "Attempted loss scale: X, reducing to Y" (or "but hysteresis is 2. ...")
_OVERFLOW = re.compile(r"(?:Overflow detected|OVERFLOW!)[^\n]{0,40}?Skipping step", re.IGNORECASE)
_SCALES = re.compile(
    r"Attempted loss scale:[ \t]{0,40}([-+.\w]{1,40}),[ \t]{0,40}(?:reducing to[ \t]{0,40}([-+.\w]{1,40}))?"
)
# "name: value" with spaces and units in the name ("iter time (s)", "samples/sec"); bounded: linear on any text
_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9_ ()/.-]{0,60}?):[ \t]{0,40}(\S{1,100})")


def looks_like_deepspeed(text: str) -> bool:
    """Whether ``text`` holds a DeepSpeed pipeline engine ``steps: N loss: X`` line."""
    return "loss:" in text and _SEARCH.search(text) is not None


def read_deepspeed_log(path: str | Path) -> RawLog:
    """Read DeepSpeed's console log (its pipeline engine's ``steps: N loss: X ...`` lines, with the engine's
    ``step=N, skipped=K, lr=[...]`` report and the loss scaler's overflow lines).

    Raises:
        LogReadError: No ``steps: N loss: X`` line.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("steps: 10 loss: 2.5012 iter time (s): 1.202 samples/sec: 26.614\\n")
        >>> list(read_deepspeed_log(p).records)
        [(10, {'loss': 2.5012, 'iter_time_s': 1.202, 'samples_sec': 26.614})]
    """
    path = Path(path)
    entries = Entries()
    scaler = ScalerOverflows()
    other_lines = step_lines = 0
    for line in read_lines(path).lines:
        if m := _STEP.search(line):
            step, fields = int(m.group(1)), _fields(line[m.end() :])
            step_lines += 1
        elif m := _REPORT.search(line):
            step, fields = int(m.group(1)), _report(m)
        else:
            if is_overflow_line(line):
                scaler.add(line)
            else:
                other_lines += bool(line.strip())
            continue
        add_entry(entries, step, {**scaler.since_last_step(), **fields})
    if not step_lines:  # the engine's reports alone hold no loss: nothing for the detectors that matter
        raise LogReadError(
            f"{path}: no 'steps: N loss: X ...' line (DeepSpeed's pipeline engine; its 'step=N, skipped=K' reports "
            "hold no loss)"
        )
    log = entries.log(path, fmt=FORMAT)
    if note := scaler.note():
        log.notes.append(f"{note}; counted at the next step line as loss_scale_overflows")
    if other_lines:
        log.notes.append(f"{other_lines} lines that are not step lines left out")
    return log


def _fields(text: str) -> dict[str, str]:
    """The ``name: value`` fields of a step line's rest (a value's trailing comma left out); the rest between
    fields is part of a name."""
    return {normalize(m.group(1)): m.group(2).rstrip(",") for m in _FIELD.finditer(text)}


def _report(m: re.Match[str]) -> dict[str, str]:
    """The engine's report's fields: ``skipped_steps``, and each parameter group's learning rate (``lr``, ``lr/1``
    …)."""
    rates = [rate.strip() for rate in m.group(3).split(",")]
    return {"skipped_steps": m.group(2), **{("lr" if i == 0 else f"lr/{i}"): rate for i, rate in enumerate(rates)}}


class ScalerOverflows:
    """DeepSpeed's loss-scaler overflow lines (`is_overflow_line`): how many since the last step line, the scale
    they left, and a note on all of them (also for another reader's console that holds them: the HF Trainer's)."""

    def __init__(self) -> None:
        self.count = self.pending = 0
        self.scale: str | None = None  # the scale the pending overflows left (None: not told)
        self.first: str | None = None  # the scale of the first overflow, before it backed off
        self.last: str | None = None

    def add(self, line: str) -> None:
        self.count += 1
        self.pending += 1
        if scales := _SCALES.search(line):
            attempted, reduced = scales.group(1), scales.group(2)
            self.first = self.first or attempted
            self.last = self.scale = reduced or attempted  # hysteresis: the scale was kept

    def since_last_step(self) -> dict[str, str | int]:
        """The fields the overflows since the last step line give the next one (none when there were none)."""
        if not self.pending:
            return {}
        fields: dict[str, str | int] = {"loss_scale_overflows": self.pending}
        if self.scale is not None:
            fields["loss_scale_after_overflow"] = self.scale
        self.pending, self.scale = 0, None
        return fields

    def note(self) -> str | None:
        """How many overflow lines there were and the scale's first and last value (None without any)."""
        if not self.count:
            return None
        scale = f": the loss scale went from {self.first} to {self.last}" if self.first is not None else ""
        return (
            f"{self.count} loss-scaler overflow line(s) (fp16 steps DeepSpeed skipped; its step count goes on){scale}"
        )


def is_overflow_line(line: str) -> bool:
    """Whether ``line`` is DeepSpeed's loss scaler (or fp16 optimizer) skipping a step for an overflow."""
    return _OVERFLOW.search(line) is not None
