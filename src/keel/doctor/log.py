"""RawLog: what a log reader returns — (step, {column: value}) records in file order, plus what was left out.

Every reader (CSV, JSONL, TensorBoard, Hugging Face ``trainer_state.json``, keel run store) produces one, so
the detection driver is the same for all of them. The records are kept column by column (`LogTable`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel._core.decision import Decision
from keel._core.errors import KeelError
from keel._core.finding import Finding
from keel.doctor.table import MAX_STEP, LogTable

if TYPE_CHECKING:
    from keel.doctor.phases import Declared


class LogReadError(KeelError):
    """A log could not be read: missing, unknown format, no step column, empty, or not a log at all.

    The message is one line that names the path and what was wrong; ``keel doctor`` prints it and exits 2.
    """


def malformed_line(path: object, number: int, line: str, expected: str) -> LogReadError:
    """The one error for a metric line that does not parse: the file, the line's number and start (60 characters),
    and what such a line looks like (``expected``)."""
    shown = line.strip()
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return LogReadError(f"{path}: line {number} ({shown!r}) {expected}")


@dataclass(kw_only=True)
class RawLog:
    """A training log as read from disk, before column names are mapped to signal keys.

    Attributes:
        source: The path read.
        format: One of `keel.doctor.FORMATS`.
        records: ``(step, {column: value})`` in file order, stored column by column (a `LogTable`; a list of
            such records is accepted and converted). A value is a float (NaN and ±inf kept as written); a
            column absent from a record was not logged at that step.
        step_column: The column the steps came from.
        text_columns: Columns left out because their values are text, not numbers.
        notes: Other things left out or repaired (rows without a step, unparsable cells, a summary entry).
        keyed: True when column names are already keel signal keys (a keel run store): no renaming.
        stored_findings: Findings the run itself recorded (keel run stores only).
        meta: Format-specific facts worth reporting (e.g. ``logging_steps`` of a Trainer state).
        rollbacks: Step → the step whose starting state a Guard restored after it (keel run stores).
        decisions: Every decision the run recorded that was not a plain ``ok`` — skips, rollbacks with their
            actions, aborts (keel run stores).
        declared: The phases and evals the run declared (`keel.doctor.phases`; keel run stores with phases).
    """

    source: str
    format: str
    records: LogTable = field(default_factory=LogTable)
    step_column: str = "step"
    text_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keyed: bool = False
    stored_findings: list[Finding] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    rollbacks: dict[int, int] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    declared: Declared | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.records, LogTable):
            records: Iterable[tuple[int, Mapping[str, float]]] = self.records
            self.records = LogTable.from_records(records)


def parse_step(value: object) -> int | None:
    """An integral step from a cell or JSON value (``12``, ``"12"``, ``12.0``); None for anything else.

    A step beyond ±2**61 is None too: no run takes that many steps, and steps are kept as int64.

    Example:
        >>> parse_step("120"), parse_step(3.0), parse_step("2.5"), parse_step(""), parse_step(True)
        (120, 3, None, None, None)
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if -MAX_STEP < value < MAX_STEP else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if number.is_integer() and -MAX_STEP < number < MAX_STEP else None


def parse_number(value: object) -> float | None:
    """A float from a cell or JSON value; ``"nan"``/``"inf"`` as written; None for text, bools and blanks.

    Example:
        >>> parse_number("2.5"), parse_number("nan"), parse_number(""), parse_number("ok"), parse_number(None)
        (2.5, nan, None, None, None)
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):  # a JSON integer may be too large for a float: it is as far off as +-inf
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            return None
    return None
