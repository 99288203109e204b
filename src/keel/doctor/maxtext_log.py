"""MaxText's console log: ``python3 -m MaxText.train ... 2>&1 | tee train.log``.

After its config dump and memory reports, MaxText prints one line per step (``metric_logger.py``; its guide
"Understand logs and metrics" shows it)::

    completed step: 9, seconds: 5.667, TFLOP/s/device: 134.924, Tokens/s/device: 8672.758, total_weights: 196608,
    loss: 10.374

(one line; older releases print only ``seconds``, ``TFLOP/s/device`` and ``loss``; absl's
``I1207 18:00:00.123 ...]`` may come first, and is left out). The fields are ``name: value`` pairs separated by
``, ``; ``seconds`` is the step's time (``step_time_s``), ``loss`` the training loss. Gradient norm and learning
rate go to TensorBoard only (``learning/grad_norm``, ``learning/current_learning_rate``: `keel doctor` reads that
folder too). Every other line is left out, counted in a note; so is a part of a step line that is not
``name: value``; a value that is not a number makes its name a text column (listed, left out).
"""

from __future__ import annotations

import re
from pathlib import Path

from keel.doctor._line_records import read_line_records
from keel.doctor.log import RawLog

FORMAT = "maxtext"
_LINE = re.compile(r"(?:^|(?<=[\s\]:]))completed step: (\d{1,18}), ")
_SEARCH = re.compile(r"(?:^|[\s\]:])completed step: \d{1,18}, [^,:\n]{1,100}: [-+.\w]", re.MULTILINE)
RENAMED = {"seconds": "step_time_s"}


def looks_like_maxtext(text: str) -> bool:
    """Whether ``text`` holds a ``completed step: N, name: value`` line."""
    return "completed step: " in text and _SEARCH.search(text) is not None


def read_maxtext_log(path: str | Path) -> RawLog:
    """Read MaxText's console log.

    Raises:
        LogReadError: No ``completed step: N, name: value, ...`` line.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("completed step: 3, seconds: 5.402, TFLOP/s/device: 141.542, loss: 11.379\\n")
        >>> list(read_maxtext_log(p).records)
        [(3, {'step_time_s': 5.402, 'TFLOP/s/device': 141.542, 'loss': 11.379})]
    """
    return read_line_records(
        Path(path),
        _LINE,
        _fields,
        fmt=FORMAT,
        line="'completed step: N, name: value, ...' line (MaxText)",
        field="'name: value'",
    )


def _fields(text: str) -> tuple[dict[str, float | str], int]:
    """The ``name: value`` fields of a step line's rest (``seconds`` renamed), and how many parts were not one."""
    fields: dict[str, float | str] = {}
    unread = 0
    for part in text.rstrip().split(", "):
        name, colon, value = part.partition(": ")
        if not colon or not name.strip():
            unread += 1
            continue
        fields[RENAMED.get(name.strip(), name.strip())] = value.strip()
    return fields, unread
