"""Exporters: a run store written out as CSV, JSON lines, TensorBoard events, a W&B run or an MLflow run.

    from keel.store.exporters import export_run
    export_run("runs/exp1", "tensorboard", "runs/exp1/tb")     # then: tensorboard --logdir runs/exp1/tb

Each format lives in the module of its name and imports its library only when called, so ``keel.store`` stays
importable without torch, TensorBoard, W&B or MLflow. Every exporter writes the same data: each signal at
its step, the findings and decisions, and the run's metadata.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keel._core.progress import step_progress
from keel.store.exporters._table import RunTable
from keel.store.schema import store_folder

EXPORTERS: dict[str, str] = {
    "csv": "wide signals.csv (a column per signal), findings.csv, decisions.csv, meta.json",
    "jsonl": "signals.jsonl (an object per step), findings.jsonl, decisions.jsonl, meta.json",
    "tensorboard": "an event file: scalars per signal, findings and decisions as text (needs keel[tensorboard])",
    "wandb": "a W&B run, offline unless mode='online' (needs keel[wandb])",
    "mlflow": "an MLflow run in a local store, sqlite by default (needs keel[mlflow])",
}


def list_exporters() -> list[str]:
    """The export formats, by name."""
    return sorted(EXPORTERS)


def export_run(
    run: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    keys: list[str] | None = None,
    progress: bool = False,
    **options: Any,
) -> list[Path]:
    """Export one run store.

    Args:
        run: The run directory (or its ``run.sqlite``).
        fmt: One of `list_exporters`.
        out: Where to write; default ``<run dir>/export/<fmt>``.
        keys: Glob patterns of the signals to export (``["loss", "grad/norm*"]``); default all.
        progress: Show a progress bar over the run's steps on stderr when stderr is a terminal (`keel export`).
        **options: Format options: ``project``/``mode`` (wandb), ``experiment``/``tracking_uri`` (mlflow).

    Returns:
        The paths written.

    Raises:
        ValueError: An unknown format.
        FileNotFoundError: No run store at ``run``.
        ImportError: The format's library is not installed (the message names the extra).

    Example:
        >>> import tempfile
        >>> from keel.store import RunWriter
        >>> run = tempfile.mkdtemp()
        >>> with RunWriter(run) as w:
        ...     w.add_signals(0, {"loss": 2.5})
        >>> [p.name for p in export_run(run, "csv")]
        ['signals.csv', 'findings.csv', 'decisions.csv', 'meta.json']
    """
    if fmt not in EXPORTERS:
        raise ValueError(f"format={fmt!r}; allowed: {', '.join(list_exporters())}")
    table = RunTable.read(run, keys)
    run_dir = store_folder(run)
    target = Path(out) if out is not None else run_dir / "export" / fmt
    exporter = importlib.import_module(f"keel.store.exporters.{fmt}").export
    with step_progress(table.rows.span, f"keel export {fmt}", enabled=progress) as reached:
        table = dataclasses.replace(table, rows=dataclasses.replace(table.rows, on_step=reached))
        if fmt not in FILE_FORMATS:  # a W&B or MLflow run: their libraries own the files
            return exporter(table, target, **options)
        return _whole(target, lambda into: exporter(table, into, **options))


FILE_FORMATS = ("csv", "jsonl", "tensorboard")  # the exporters that write plain files into ``out``


def _whole(target: Path, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Run ``write`` into a folder beside ``target``, then move what it wrote into ``target``: all of it or nothing.

    On a full disk a truncated signals file had replaced the last export, and the error named no file.

    Raises:
        OSError: The export could not be written, naming ``target``; ``target`` is as it was and the partial
            folder is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # one a killed export of this process id left
    try:
        written = write(partial)
        target.mkdir(parents=True, exist_ok=True)
        for path in written:
            os.replace(path, target / path.name)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return [target / path.name for path in written]


__all__ = ["EXPORTERS", "RunTable", "export_run", "list_exporters"]
