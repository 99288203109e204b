"""CSV (or TSV) logs: a header row with a step column, then one row per logged step.

Numeric columns become signals; a column whose non-empty cells are mostly text (a date, a run name) is
left out and listed. In a numeric column an empty cell means "not logged at this step", ``nan``/``inf``
are kept as written (a NaN loss is a finding), and a stray text cell is treated as empty and counted.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from keel.doctor._text import read_text
from keel.doctor.columns import STEP_COLUMNS, find_step_column
from keel.doctor.log import LogReadError, RawLog, parse_number, parse_step


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
    text = read_text(path)
    rows = list(csv.reader(io.StringIO(text), dialect=_dialect(text)))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise LogReadError(f"{path}: the file is empty")
    header = [cell.strip() for cell in rows[0]]
    step_column = find_step_column(header)
    if step_column is None:
        raise LogReadError(f"{path}: no step column among {', '.join(header[:12]) or '(none)'}; "
                           f"allowed names: {', '.join(STEP_COLUMNS)}")
    body = rows[1:]
    if not body:
        raise LogReadError(f"{path}: a header but no data rows")
    step_index = header.index(step_column)
    log = RawLog(source=str(path), format="csv", step_column=step_column)
    numeric = []
    for i, name in enumerate(header):
        if i == step_index or not name:
            continue
        cells = [row[i].strip() for row in body if i < len(row) and row[i].strip()]
        parsed = sum(parse_number(c) is not None for c in cells)
        if cells and parsed * 2 < len(cells):
            log.text_columns.append(name)
        else:
            numeric.append((i, name))
    no_step = text_cells = 0
    for row in body:
        step = parse_step(row[step_index]) if step_index < len(row) else None
        if step is None:
            no_step += 1
            continue
        values: dict[str, float] = {}
        for i, name in numeric:
            cell = row[i] if i < len(row) else ""
            value = parse_number(cell)
            if value is not None:
                values[name] = value
            elif cell.strip():
                text_cells += 1
        log.records.append((step, values))
    if not log.records:
        raise LogReadError(f"{path}: no row has an integer in the step column {step_column!r}")
    if no_step:
        log.notes.append(f"{no_step} row(s) without an integer step were skipped")
    if text_cells:
        log.notes.append(f"{text_cells} text cell(s) in numeric columns were read as not logged")
    return log


def _dialect(text: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(text[:8192], delimiters=",\t;")
    except csv.Error:
        return csv.excel_tab if "\t" in text.partition("\n")[0] else csv.excel
