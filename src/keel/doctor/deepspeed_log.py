"""DeepSpeed's own console lines: the pipeline engine's ``steps: N loss: X ...`` line, saved from stdout.

DeepSpeed's ``PipelineEngine.train_batch`` (``deepspeed/runtime/pipe/engine.py``) prints, every
``steps_per_print`` steps on global rank 0::

    steps: 2499 loss: 13.4013 iter time (s): 1.202 samples/sec: 26.614

(newer releases put each additional loss, ``name: value``, before ``iter time``; forks print
``step:  2499 /  5000 loss: ...`` and an ``eta:``). Whatever comes before ``steps:`` on a line (a launcher's rank
tag, ``[^^]``) is left out. Every other line is left out and counted in a note: the engine's own ``[Rank 0]
step=N, skipped=K, lr=[...]`` (no loss in it); its loss scaler's ``Overflow detected. Skipping step.`` lines
are counted in a note of their own (which steps they skipped is not told: the ``steps:`` lines are every
``steps_per_print``).
A Megatron-DeepSpeed log holds Megatron's ``iteration`` lines too: it is read as Megatron's
(`keel.doctor.megatron_log`), which it is detected as first.
"""

from __future__ import annotations

import re
from pathlib import Path

from keel.doctor._line_records import read_line_records
from keel.doctor.columns import normalize
from keel.doctor.log import RawLog

FORMAT = "deepspeed"
_HEAD = r"steps?:[ \t]{0,40}(\d{1,18})(?:[ \t]{0,40}/[ \t]{0,40}\d{1,18})?[ \t]{1,40}"
_STEP = re.compile(rf"(?:^|(?<=[\s\]>])){_HEAD}(?=loss:)")
_SEARCH = re.compile(rf"(?:^|[\s\]>]){_HEAD}loss:[ \t]{{0,40}}[-+.\w]", re.MULTILINE)  # bounded: linear
# "name: value" with spaces and units in the name ("iter time (s)", "samples/sec"); bounded: linear on any text
# the loss scaler's "Overflow detected. Skipping step." / older "[deepspeed] OVERFLOW! Rank 0 Skipping step."
_OVERFLOW = re.compile(r"(?:Overflow detected|OVERFLOW!)[^\n]{0,40}?Skipping step", re.IGNORECASE)
OVERFLOW_NOTE = "{count} loss-scaler overflow lines (fp16 steps DeepSpeed skipped; its 'steps:' count goes on) left out"
_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9_ ()/.-]{0,60}?):[ \t]{0,40}(\S{1,100})")


def looks_like_deepspeed(text: str) -> bool:
    """Whether ``text`` holds a DeepSpeed pipeline engine ``steps: N loss: X`` line."""
    return "loss:" in text and _SEARCH.search(text) is not None


def read_deepspeed_log(path: str | Path) -> RawLog:
    """Read DeepSpeed's console log (its pipeline engine's ``steps: N loss: X ...`` lines).

    Raises:
        LogReadError: No ``steps: N loss: X`` line.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("steps: 10 loss: 2.5012 iter time (s): 1.202 samples/sec: 26.614\\n")
        >>> list(read_deepspeed_log(p).records)
        [(10, {'loss': 2.5012, 'iter_time_s': 1.202, 'samples_sec': 26.614})]
    """
    return read_line_records(
        Path(path),
        _STEP,
        _fields,
        fmt=FORMAT,
        line="'steps: N loss: X ...' line (DeepSpeed's pipeline engine)",
        field="'name: value'",
        counted=(_OVERFLOW, OVERFLOW_NOTE),
    )


def _fields(text: str) -> tuple[dict[str, float | str], int]:
    """The ``name: value`` fields of a step line's rest (a value's trailing comma left out); nothing is counted as
    unread: the rest between fields is part of a name."""
    return {normalize(m.group(1)): m.group(2).rstrip(",") for m in _FIELD.finditer(text)}, 0
