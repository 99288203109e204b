"""verl's console log: the ``console`` tracker's lines (``trainer.logger=['console', ...]``), saved from stdout.

verl's ``LocalLogger`` (``verl/utils/logger/aggregate_logger.py``) prints one line per training step, the numeric
metrics of that step joined by `` - `` (``concat_dict_to_str``)::

    step:12 - actor/entropy:0.4861 - actor/pg_loss:-0.0123 - actor/grad_norm:0.2337 - actor/lr:1e-06 - ...

A value is ``pprint.pformat`` of the number, so under numpy 2 a numpy scalar prints as ``np.float64(0.2337)``
(its number is read); older verl printed ``{v:.3f}``. The PPO trainer runs inside a Ray actor, so each line
usually starts with Ray's ``(TaskRunner pid=2397)`` in ANSI colours: whatever precedes ``step:N - `` is left
out, ANSI escapes first. Every other line (Hydra's config dump, vLLM's and Ray's messages, tqdm bars) is left out
and counted in a note; so is a part of a step line that is not ``name:value``, and a value that is not a number
makes its name a text column (listed, left out).

Names are kept (verl's ``actor/grad_norm``, ``actor/lr``, ``actor/pg_loss``, ``actor/entropy``,
``critic/score/mean``, ``response_length/mean`` … are mapped to keel keys by `keel.doctor.columns`), except the SFT
trainer's ``train/lr(1e-3)``: the learning rate × 1000, read back as ``train/lr``.
"""

from __future__ import annotations

import re
from pathlib import Path

from keel.doctor._line_records import read_line_records
from keel.doctor.log import RawLog

FORMAT = "verl"
_STEP = re.compile(r"(?:^|(?<=[\s)\]>]))step:(\d{1,18}) - ")
# a step line anywhere (ANSI codes or Ray's actor tag before it); bounded: linear on any text
_SEARCH = re.compile(r"(?:^|[\s)\]>m])step:\d{1,18} - [^\s:]{1,200}:[-+.\w(]", re.MULTILINE)
_SEPARATOR = " - "
_NUMPY_SCALAR = re.compile(r"np\.(?:float|int|uint)\d{1,3}\((.{1,64})\)")  # numpy 2's repr of a scalar
SCALED = {"train/lr(1e-3)": ("train/lr", 1e-3)}  # verl's SFT trainer logs the learning rate × 1000


def looks_like_verl(text: str) -> bool:
    """Whether ``text`` holds a ``step:N - name:value`` line."""
    return "step:" in text and _SEARCH.search(text) is not None  # the first test: fast on other logs


def read_verl_log(path: str | Path) -> RawLog:
    """Read verl's console log.

    Raises:
        LogReadError: No ``step:N - name:value`` line.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("(TaskRunner pid=7) step:1 - actor/pg_loss:np.float64(-0.01) - actor/lr:1e-06\\n")
        >>> list(read_verl_log(p).records)
        [(1, {'actor/pg_loss': -0.01, 'actor/lr': 1e-06})]
    """
    return read_line_records(
        Path(path),
        _STEP,
        _fields,
        fmt=FORMAT,
        line="'step:N - name:value - ...' line (verl's console logger)",
        field="'name:value'",
    )


def _fields(text: str) -> tuple[dict[str, float | str], int]:
    """The ``name:value`` fields of a step line's rest (numpy reprs unwrapped, scaled names read back), and how many
    parts were not such a field."""
    fields: dict[str, float | str] = {}
    unread = 0
    for part in text.rstrip().split(_SEPARATOR):
        name, colon, value = part.strip().rpartition(":")
        if not colon or not name:
            unread += 1
            continue
        value = value.strip()
        if numpy := _NUMPY_SCALAR.fullmatch(value):
            value = numpy.group(1)
        if name == "step":  # the line's own step is "step"
            name = "step (field)"
        if name in SCALED:
            name, factor = SCALED[name]
            try:
                fields[name] = float(value) * factor
            except ValueError:
                unread += 1
            continue
        fields[name] = value
    return fields, unread
