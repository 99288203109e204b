"""CSV export: ``signals.csv`` (one row per step, one column per signal), ``findings.csv``, ``decisions.csv``,
``meta.json``.

The signals file is the wide layout spreadsheets and ``keel doctor`` read: a ``step`` column, an empty cell where
a signal was not logged at that step, ``nan``/``inf`` written as such.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from keel.store.exporters._table import RunTable

FINDING_COLUMNS = ("step", "kind", "severity", "signal", "value", "baseline", "cause", "advice", "evidence")
DECISION_COLUMNS = ("step", "action", "by", "onset", "restored_step", "reason")


def export(table: RunTable, out: Path) -> list[Path]:
    """Write the four files into ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    signals, findings, decisions, meta = (
        out / "signals.csv",
        out / "findings.csv",
        out / "decisions.csv",
        out / "meta.json",
    )
    with signals.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *(_cell(k) for k in table.keys)])
        for step, values in table.rows:
            writer.writerow([step, *(repr(values[k]) if k in values else "" for k in table.keys)])
    with findings.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FINDING_COLUMNS)
        for record in table.finding_records():
            writer.writerow(
                [_cell(json.dumps(record[c])) if c == "evidence" else _cell(record[c]) for c in FINDING_COLUMNS]
            )
    with decisions.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DECISION_COLUMNS)
        for record in table.decision_records():
            writer.writerow([_cell(record[c]) for c in DECISION_COLUMNS])
    meta.write_text(json.dumps(table.meta, indent=1, default=str))
    return [signals, findings, decisions, meta]


# A text cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets; store text is
# untrusted (a crafted run, a finding quoting a column name), so such cells get a leading apostrophe (OWASP
# "CSV injection"). Numbers are written as numbers.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
