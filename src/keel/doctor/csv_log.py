"""CSV (or TSV) logs: a header row with a step column, then one row per logged step.

With no step column, an ``epoch`` column is the step (Keras' ``CSVLogger`` writes ``epoch,<metrics in name order>``,
one row per epoch: ``keras/src/callbacks/csv_logger.py``), and a note says the steps are epochs.

Numeric columns become signals; a column whose non-empty cells are mostly text (a date, a run name) is
left out and listed. In a numeric column an empty cell means "not logged at this step", ``nan``/``inf``
are kept as written (a NaN loss is a finding), and a stray text cell is treated as empty and counted.

The file is streamed: the `csv` module parses a block of rows at a time, each block is turned into columns
(``zip``) and each column into floats with one ``map(float, …)`` (cell by cell only when a block holds an
empty or text cell), and only the numbers are kept, in arrays. Memory is the numbers, not the text: a
million-row log with four numeric columns and a text column holds about 70 MB. A row the `csv` module cannot
read — a cell over its 128 KiB limit — is skipped and named in the notes; a header it cannot read is an error.
Two columns with one name keep both: the first under that name, the next as ``name (column N)``, with a note.
"""

from __future__ import annotations

import csv
import itertools
import math
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from keel.doctor._text import check_text_head, open_text, undecodable
from keel.doctor.columns import STEP_COLUMNS, find_step_column, normalize
from keel.doctor.log import LogReadError, RawLog
from keel.doctor.table import MAX_STEP, Column, LogTable

EPOCH = "epoch"  # the step column of a log that has no other (Keras' CSVLogger writes "epoch" and its metrics)
EPOCHS_NOTE = "no step column: the steps are epochs (column 'epoch', as Keras' CSVLogger writes one row per epoch)"
MAX_COLUMNS = 100_000  # more columns than any training log has; a header with more is not one
# Rows parsed before they are turned into columns: at most 4096 (rows that die young are cheap for Python's
# garbage collector; 100k-row blocks made reading a million rows twice as slow) and at most 2**18 cells
# (~15 MB of str objects, whatever the width).
_CHUNK_ROWS = 4096
_CHUNK_CELLS = 1 << 18
_BLOCK_CHARS = 1 << 20  # characters read at a time while looking for the end of a long first line
_SNIFF_CHARS = 8192


def read_csv_log(path: str | Path) -> RawLog:
    """Read a CSV/TSV training log.

    Args:
        path: The file.

    Returns:
        The `RawLog`, records in row order.

    Raises:
        LogReadError: Empty, not text, no header, no step column, or no data row with a step.
    """
    path = Path(path)
    check_text_head(path)
    with open_text(path, newline="") as fh:
        try:
            return _read(path, fh)
        except UnicodeDecodeError:
            raise undecodable(path, fh) from None


@dataclass
class _Numbers:
    """What one column held so far: its numbers (in rows with a step) and how many cells were text.

    The numbers grow in `array`s rather than as a list of per-block arrays: a file with thousands of columns
    has blocks of a few rows, and an array object per column per block would cost more than the numbers.
    """

    name: str
    rows: array = field(default_factory=lambda: array("q"))
    values: array = field(default_factory=lambda: array("d"))
    cells: int = 0  # non-empty cells, in every row (text or not is decided over all of them)
    parsed: int = 0  # non-empty cells that are numbers
    text_with_step: int = 0  # text cells in rows that have a step (counted if the column stays numeric)


def _read(path: Path, fh: TextIO) -> RawLog:
    reader = csv.reader(fh, _dialect(fh))
    header = _header(path, reader)
    export = wandb_export(header)
    history = wandb_history_step(header)
    step_column = history or find_step_column(header) or _epoch_column(header) or (header[0] if export else None)
    if step_column is None:
        raise LogReadError(
            f"{path}: no step column among {', '.join(header[:12]) or '(none)'}; "
            f"allowed names: {', '.join(STEP_COLUMNS)} (or {EPOCH} alone)"
        )
    step_index = header.index(step_column)
    names, renamed = _unique_names(export.names or header)
    if export:
        renamed.append(export.note)
    left_out = {i for i, name in enumerate(names) if name in WANDB_BOOKKEEPING} if history else set()
    numbers = {i: _Numbers(name) for i, name in enumerate(names) if i != step_index and name and i not in left_out}
    state = _State(width=len(header), step_index=step_index, numbers=numbers)
    skipped: list[str] = []  # rows the csv module could not read
    rows = _readable_rows(reader, skipped)
    chunk_rows = max(1, min(_CHUNK_ROWS, _CHUNK_CELLS // len(header)))
    while chunk := list(itertools.islice(rows, chunk_rows)):
        state.add(chunk)
    log = _finish(path, state, step_column, renamed, skipped)
    if export:
        log.notes.append(_bounds_read(log.records))
    if normalize(step_column) == EPOCH:
        log.notes.append(EPOCHS_NOTE)
    if history:
        own = " (the run's own; W&B's _step counts its log calls)" if step_column != "_step" else ""
        log.notes.append(f"a W&B history export: the steps are {step_column!r}{own}; _runtime, _timestamp left out")
    return log


WANDB_BOOKKEEPING = frozenset({"_step", "_runtime", "_timestamp"})


def wandb_history_step(header: list[str]) -> str | None:
    """The step column of a W&B run history saved as CSV (``wandb.Api().run(...).history().to_csv()``, or the
    ``scan_history`` rows written out): the run's own step column when it logs one (the HF Trainer's
    ``train/global_step``), as `keel.doctor.wandb_log` reads the run itself, else ``_step``; None for a header
    without W&B's ``_step`` and ``_runtime`` or ``_timestamp``."""
    names = set(header)
    if "_step" not in names or not names & {"_runtime", "_timestamp"}:
        return None
    return find_step_column([name for name in header if not name.startswith("_")]) or "_step"


@dataclass
class WandbExport:
    """How to read the CSV of a W&B chart's "Export panel data" (see `wandb_export`)."""

    names: list[str] = field(default_factory=list)  # the columns' names, each run's series under its metric's name
    bounds: frozenset[int] = frozenset()  # the ``__MIN``/``__MAX`` columns
    note: str = ""

    def __bool__(self) -> bool:
        return bool(self.names)


_RUN_SERIES = re.compile(r"(.{1,500}?) - (.{1,500})")
_BOUNDS = ("__MIN", "__MAX")


def wandb_export(header: list[str]) -> WandbExport:
    """The W&B web UI's chart export, read as one run's log; empty (false) for any other header.

    W&B writes the chart's x axis first (``Step``, or the axis' own name), then three columns per run and metric:
    ``<run name> - <metric>``, ``<run name> - <metric>__MIN`` and ``__MAX`` (the same value unless the chart
    groups runs or buckets steps; wandb/wandb#5349, #6474). Of one run, the series keep the metric's name
    (``train/loss`` is then the loss, ``train/loss__MAX`` its bound); several runs' series keep their full names (a
    note says so: export one run's chart to examine it), as does a metric whose name another column already has.
    The bounds are left out where they equal the series (`_bounds_read`).
    """
    names = header[:]
    bounds = frozenset(i for i, name in enumerate(names) if i and name.endswith(_BOUNDS))
    series = {i: _RUN_SERIES.fullmatch(name) for i, name in enumerate(names) if i and i not in bounds and name}
    if not series or not all(series.values()) or not all(names[1:]):
        return WandbExport()
    if sorted(names[i] for i in bounds) != sorted(names[j] + end for j in series for end in _BOUNDS):
        return WandbExport()  # not each series with its two bounds: not W&B's shape
    runs = sorted({m.group(1) for m in series.values() if m})
    note = "a W&B chart export"
    if len(runs) > 1:
        shown = ", ".join(map(repr, runs[:3])) + (" …" if len(runs) > 3 else "")
        return WandbExport(
            names,
            bounds,
            f"{note}; it holds {len(runs)} runs ({shown}), read side by side under "
            "their full names: export one run's chart to examine that run",
        )
    taken = set(names)
    for i, m in series.items():
        if m and m.group(2) not in taken:
            names[i] = m.group(2)
            for j in bounds:
                if names[j].startswith(header[i]) and names[j][len(header[i]) :] in _BOUNDS:
                    names[j] = m.group(2) + names[j][len(header[i]) :]
    return WandbExport(names, bounds, f"{note}; the run {runs[0]!r}: its series under their metrics' names")


def _bounds_read(table: LogTable) -> str:
    """Leave a chart export's ``__MIN``/``__MAX`` columns out of ``table`` when each equals its bound at every step
    (one run, no buckets), or keep them; the note that says which."""
    bounds = [name for name in table.columns if name.endswith(_BOUNDS)]
    apart = 0
    for name in bounds:
        if name.endswith("__MIN") and (high := table.columns.get(name[: -len("__MIN")] + "__MAX")) is not None:
            low = table.columns[name]
            _, at_low, at_high = np.intersect1d(low.rows, high.rows, return_indices=True)
            apart += int(np.sum(low.values[at_low] != high.values[at_high]))
    if not apart:
        for name in bounds:
            del table.columns[name]
        return f"its {len(bounds)} __MIN/__MAX columns equal the series at every step and are left out"
    return (
        f"its __MIN/__MAX differ at {apart} point(s): the series are aggregates (a group of runs' mean, or steps "
        "bucketed by the chart), so one run's or one step's spike is averaged in; the bounds are kept as signals — "
        "read the run itself (its wandb/run-… folder) for every step"
    )


def _epoch_column(header: list[str]) -> str | None:
    """The ``epoch`` column of a log with no step column (Keras' ``CSVLogger``: one row per epoch), or None."""
    return next((name for name in header if normalize(name) == EPOCH), None)


def _readable_rows(reader: Any, skipped: list[str]) -> Iterator[list[str]]:
    """The rows ``reader`` can read; one it cannot (a cell over the csv module's limit) is named in
    ``skipped``, and the reader goes on with the next line."""
    while True:
        try:
            yield from reader
            return
        except csv.Error as exc:
            skipped.append(f"line {reader.line_num} ({exc})")


def _header(path: Path, reader: Iterator[list[str]]) -> list[str]:
    """The first row with a non-blank cell, stripped."""
    while True:
        try:
            row = next(reader, None)
        except csv.Error as exc:
            raise LogReadError(f"{path}: the header line cannot be read ({exc})") from None
        if row is None:
            raise LogReadError(f"{path}: the file is empty")
        if any(cell.strip() for cell in row):
            if len(row) > MAX_COLUMNS:
                raise LogReadError(f"{path}: the header has {len(row)} columns; at most {MAX_COLUMNS} are read")
            return [cell.strip() for cell in row]


def _unique_names(header: list[str]) -> tuple[list[str], list[str]]:
    """The column names with each repeated one made distinct (``loss (column 3)``), and notes saying so."""
    names: list[str] = []
    first: dict[str, int] = {}
    notes = []
    taken = set(header)
    for i, name in enumerate(header):
        if name and name in first:
            new = f"{name} (column {i + 1})"
            while new in taken:
                new += "'"
            taken.add(new)
            notes.append(
                f"column {i + 1} is also named {name!r}: {name!r} is column {first[name] + 1}, "
                f"column {i + 1} is read as {new!r}"
            )
            names.append(new)
        else:
            first.setdefault(name, i)
            names.append(name)
    return names, notes


@dataclass
class _State:
    """Blocks of parsed rows → step and number columns, and what was counted on the way."""

    width: int
    step_index: int
    numbers: dict[int, _Numbers]
    steps: array = field(default_factory=lambda: array("q"))
    records: int = 0  # rows with a step so far
    body: int = 0  # non-blank rows after the header
    no_step: int = 0

    def add(self, rows: list[list[str]]) -> None:
        if not rows:
            return
        width = self.width
        as_read = rows  # a row is blank if every cell is, those past the header's width too
        if set(map(len, rows)) != {width}:  # ragged rows: missing cells are empty, extra ones ignored
            rows = [row[:width] if len(row) > width else row + [""] * (width - len(row)) for row in rows]
        columns = list(zip(*rows, strict=True))
        steps = _floats(columns[self.step_index], strip=False)[0]  # `parse_step` reads the cell as it is
        valid = np.isfinite(steps) & (steps == np.floor(steps)) & (np.abs(steps) < MAX_STEP)
        blank = 0
        if not valid.all():
            blank = sum(not any(cell.strip() for cell in as_read[i]) for i in np.flatnonzero(~valid).tolist())
            self.no_step += int((~valid).sum()) - blank
        self.body += len(rows) - blank
        row_ids = np.cumsum(valid) - 1 + self.records  # the table row of each valid row
        self.steps.frombytes(steps[valid].astype(np.int64).tobytes())
        self.records += int(valid.sum())
        for i, col in self.numbers.items():
            values, parsed, text = _floats(columns[i])
            col.cells += int(parsed.sum() + text.sum())
            col.parsed += int(parsed.sum())
            col.text_with_step += int((text & valid).sum())
            keep = parsed & valid
            col.rows.frombytes(row_ids[keep].astype(np.int64).tobytes())
            col.values.frombytes(values[keep].tobytes())


def _floats(cells: tuple[str, ...], *, strip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, which cells are numbers, which are text) of a column's cells; NaN where not a number.

    ``float(cell)`` is `parse_number` for a cell: it ignores surrounding whitespace and reads ``nan``/``inf``.
    Three ways, fastest first: every cell a number (one ``map``); numbers and empty cells (a sparse column:
    the empty ones set aside by length, the rest one ``map``); anything else cell by cell, each distinct text
    parsed once (a text column repeats a few values).
    """
    n = len(cells)
    try:
        return np.fromiter(map(float, cells), dtype=np.float64, count=n), np.ones(n, dtype=bool), np.zeros(n, bool)
    except ValueError:
        pass
    filled = np.fromiter(map(len, cells), dtype=np.int64, count=n) > 0
    at = np.flatnonzero(filled)
    try:
        numbers = np.fromiter(map(float, [cells[i] for i in at.tolist()]), dtype=np.float64, count=len(at))
    except ValueError:
        pass
    else:
        values = np.full(n, np.nan)
        values[at] = numbers
        return values, filled, np.zeros(n, dtype=bool)
    distinct = list(set(cells))
    if len(distinct) * 4 <= n:  # a text column of a few values ("warmup", "main"): each parsed once
        where = {cell: i for i, cell in enumerate(distinct)}
        which: np.ndarray | None = np.fromiter(map(where.__getitem__, cells), dtype=np.int64, count=n)
        parsed = [_cell(cell, strip) for cell in distinct]
    else:
        which = None
        parsed = [_cell(cell, strip) for cell in cells]
    values_, numeric, text = (np.array(column) for column in zip(*parsed, strict=True))
    if which is None:
        return values_.astype(np.float64), numeric.astype(bool), text.astype(bool)
    return values_.astype(np.float64)[which], numeric.astype(bool)[which], text.astype(bool)[which]


def _cell(cell: str, strip: bool = True) -> tuple[float, bool, bool]:
    """(value, is a number, is text) of one cell, read as `parse_number` reads it (``strip``: the cell stripped
    first — ``str.strip`` also removes the separators ``\\x1c``–``\\x1f``, which ``float`` keeps) or as `parse_step`
    does (``float`` of the cell as it is)."""
    try:
        return float(cell), True, False
    except ValueError:
        text = cell.strip()
        if strip and text != cell:
            try:
                return float(text), True, False
            except ValueError:
                pass
        return math.nan, False, bool(text)


def _without_nan_padding(column: Column, steps: np.ndarray) -> tuple[Column, int]:
    """``column`` without the NaN cells that pad it between its logged steps, and how many there were.

    A CSV written with ``na_rep="NaN"`` (pandas ``to_csv`` of a history whose columns are logged at different
    cadences) has NaN, not an empty cell, where a column was not logged. A column whose finite values lie on a
    lattice of steps — every k ≥ 2 steps from the first, at least 3 of them — has its NaN cells off that lattice
    read as not logged. A NaN on the lattice is the run's own (kept), and so is every NaN of a column logged every
    step; ±inf is never padding.
    """
    nan = np.isnan(column.values)
    if not nan.any():
        return column, 0
    logged = steps[column.rows[~nan]]
    if len(logged) < 3:
        return column, 0
    every = int(np.gcd.reduce(np.abs(np.diff(logged))))
    if every < 2:
        return column, 0
    padding = nan & ((steps[column.rows] - logged[0]) % every != 0)
    if not padding.any():
        return column, 0
    kept = ~padding
    return Column(rows=column.rows[kept], values=column.values[kept]), int(padding.sum())


def _padding_note(padding: dict[str, int]) -> str:
    names = ", ".join(list(padding)[:6]) + (" …" if len(padding) > 6 else "")
    return (
        f"{sum(padding.values())} NaN cell(s) between the logged steps of columns logged every few steps ({names}) "
        "read as not logged (a CSV written with na_rep='NaN'); a NaN at a logged step is kept"
    )


def _finish(path: Path, state: _State, step_column: str, renamed: list[str], skipped: list[str]) -> RawLog:
    lost = f" ({len(skipped)} unreadable row(s), first at {skipped[0]})" if skipped else ""
    if not state.body:
        raise LogReadError(f"{path}: a header but no data rows{lost}")
    if not state.records:
        raise LogReadError(f"{path}: no row has an integer in the step column {step_column!r}{lost}")
    log = RawLog(source=str(path), format="csv", step_column=step_column)
    columns = {}
    text_cells = 0
    for col in state.numbers.values():
        if col.cells and col.parsed * 2 < col.cells:
            log.text_columns.append(col.name)
        else:
            columns[col.name] = Column(
                rows=np.frombuffer(col.rows, dtype=np.int64), values=np.frombuffer(col.values, dtype=np.float64)
            )
            text_cells += col.text_with_step
    steps = np.frombuffer(state.steps, dtype=np.int64)
    padded = {name: _without_nan_padding(column, steps) for name, column in columns.items()}
    columns = {name: column for name, (column, _) in padded.items()}
    if padding := {name: count for name, (_, count) in padded.items() if count}:
        log.notes.append(_padding_note(padding))
    log.records = LogTable(steps, columns)
    if state.no_step:
        log.notes.append(f"{state.no_step} row(s) without an integer step were skipped")
    if text_cells:
        log.notes.append(f"{text_cells} text cell(s) in numeric columns were read as not logged")
    log.notes += renamed
    if skipped:
        log.notes.append(
            f"{len(skipped)} row(s) the csv module could not read were skipped: "
            + "; ".join(skipped[:5])
            + (" …" if len(skipped) > 5 else "")
        )
    return log


def _dialect(fh: TextIO) -> type[csv.Dialect] | csv.Dialect:
    """The sniffed dialect of the file's first 8 KiB (then the file is rewound)."""
    head = fh.read(_SNIFF_CHARS)
    try:
        return csv.Sniffer().sniff(head, delimiters=",\t;")
    except csv.Error:
        first = head.partition("\n")[0]
        while "\n" not in head and (more := fh.read(_BLOCK_CHARS)):  # a first line longer than the head
            head = more
            first += more.partition("\n")[0]
        return csv.excel_tab if "\t" in first else csv.excel
    finally:
        fh.seek(0)
