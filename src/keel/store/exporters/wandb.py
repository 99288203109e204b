"""Weights & Biases export, offline by default: signals as history at their step, findings and decisions as
tables, the run's config as the W&B config and its status and counts in the summary. Needs ``wandb``
(``pip install 'keel[wandb]'``). An offline run can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from keel.store.exporters._table import RunTable

FINDINGS_KEY, DECISIONS_KEY = "keel/findings", "keel/decisions"
BLOCK = 32768


def export(
    table: RunTable, out: Path, *, project: str = "keel", mode: Literal["online", "offline"] = "offline"
) -> list[Path]:
    """Log the run into a W&B run under ``out`` (``mode="online"`` uploads); returns the run's directory."""
    try:
        import wandb
    except ImportError as exc:
        raise ImportError("keel export --format wandb needs wandb: pip install 'keel[wandb]'") from exc
    out.mkdir(parents=True, exist_ok=True)
    config = {"keel": {k: v for k, v in table.meta.items() if k != "config"}, **(table.meta.get("config") or {})}
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(mode=mode, dir=str(out), project=project, name=table.name, config=config, reinit="create_new")
    try:
        last = 0  # the findings and decisions tables are logged at the last step
        for step, values in table.rows:
            run.log(values, step=step)
            last = step
        columns, rows = _table(
            table.finding_records(), ("step", "kind", "severity", "signal", "value", "baseline", "cause", "advice")
        )
        run.log({FINDINGS_KEY: wandb.Table(columns=columns, data=rows)}, step=last)
        columns, rows = _table(table.decision_records(), ("step", "action", "by", "onset", "restored_step", "reason"))
        run.log({DECISIONS_KEY: wandb.Table(columns=columns, data=rows)}, step=last)
        run.summary.update(
            {
                "keel/status": table.meta.get("status"),
                "keel/findings_count": len(table.findings),
                "keel/decisions_count": len(table.decisions),
            }
        )
        directory = Path(run.dir).parent
    finally:
        run.finish()
    _wait_until_written(directory)
    return [directory]


def records(path: str | Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file, as W&B's protobuf ``Record`` messages.

    The format is W&B's log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each
    with a 7-byte header (CRC-32, length, type: 1 full, 2 first, 3 middle, 4 last). A truncated tail (a file
    still being written) ends the iteration.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (header {data[:4]!r}); allowed: a run-<id>.wandb file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            return
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wait_until_written(directory: Path, timeout: float = 60.0) -> None:
    """``run.finish()`` returns before W&B's background process has written the run file; wait for its exit
    record so the export is complete when this function returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in directory.glob("run-*.wandb"):
            if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
                return
        time.sleep(0.1)
    raise TimeoutError(f"W&B did not finish writing {directory} within {timeout:.0f} s")


def _table(records: list[dict[str, Any]], columns: tuple[str, ...]) -> tuple[list[str | int], list[list[Any]]]:
    return list(columns), [[r[c] for c in columns] for r in records]
