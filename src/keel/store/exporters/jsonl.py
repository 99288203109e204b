"""JSON-lines export: ``signals.jsonl`` (one object per step: ``{"step": 3, "loss": 2.1, …}``), ``findings.jsonl``,
``decisions.jsonl``, ``meta.json``.

Non-finite values are written as ``NaN``/``Infinity`` (as Python's and ``keel doctor``'s JSON readers accept);
``null`` never stands for NaN.
"""

from __future__ import annotations

import json
from pathlib import Path

from keel.store.exporters._table import RunTable


def export(table: RunTable, out: Path) -> list[Path]:
    """Write the four files into ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "signals.jsonl", out / "findings.jsonl", out / "decisions.jsonl", out / "meta.json"]
    with paths[0].open("w") as f:
        for step, values in table.rows:
            f.write(json.dumps({"step": step, **values}) + "\n")
    for path, records in ((paths[1], table.finding_records()), (paths[2], table.decision_records())):
        with path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    paths[3].write_text(json.dumps(table.meta, indent=1, default=str))
    return paths
