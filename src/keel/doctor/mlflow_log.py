"""MLflow runs, read without mlflow: the file store (``mlruns/<experiment>/<run>/metrics/<key>``) and the SQLite
backend MLflow 3 defaults to (``mlflow.db``, table ``metrics``, opened read-only).

File store: a run folder holds ``meta.yaml`` and ``metrics/``, one file per metric (a key with ``/`` is a sub-folder:
``metrics/train/loss``), one line per logged value: ``timestamp value step``, or ``timestamp value`` from MLflow
before 1.0 (step 0, as MLflow reads it); ``nan``/``inf`` as Python prints them. SQLite: ``metrics(key, value,
timestamp, run_uuid, step, is_nan)``; MLflow writes NaN as value 0 with ``is_nan`` 1 and ±inf as ±1.7976931348623157e308
(the largest double), read back as NaN and ±inf here. Deleted runs (``lifecycle_stage`` ``deleted``, the file
store's ``.trash``) are not read. A database of several runs names each as ``mlflow.db/<run id>``:
`keel.doctor.find_logs` lists them, `read_mlflow_log` reads one.

MLflow keeps each metric's series on its own, with no write order across metrics: records are put together by step
(one record per step; a metric logged twice at a step — a resumed run going over its steps again — starts a second
record there, in timestamp order).
"""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import numpy as np

from keel.doctor._folders import runs_below, several_runs_error
from keel.doctor.hf_log import SUMMARY_KEYS
from keel.doctor.log import LogReadError, RawLog, parse_step
from keel.doctor.store_log import is_sqlite
from keel.doctor.table import Scalars

METRICS_COLUMNS = frozenset({"key", "value", "timestamp", "run_uuid", "step", "is_nan"})
LARGEST = sys.float_info.max  # what MLflow's database stores for +inf
TRAINER_SUMMARY = ("train_loss", "train_steps_per_second")  # with hf_log.SUMMARY_KEYS, logged once at the end


def is_mlflow_run(folder: Path) -> bool:
    """Whether ``folder`` is a file-store run: ``meta.yaml`` and a ``metrics`` folder."""
    return (folder / "meta.yaml").is_file() and (folder / "metrics").is_dir()


def mlflow_runs(folder: Path) -> list[Path]:
    """The file-store run folders ``folder`` stands for: itself, those of an experiment folder, of ``mlruns``, or
    of a project folder holding ``mlruns``."""
    return runs_below(folder, is_mlflow_run, depth=3)


def is_mlflow_db(path: Path) -> bool:
    """Whether ``path`` is an SQLite file with MLflow's ``metrics`` and ``runs`` tables."""
    if not (path.is_file() and is_sqlite(path)):
        return False
    try:
        with closing(_connect(path)) as db:
            return METRICS_COLUMNS <= _columns(db, "metrics") and "run_uuid" in _columns(db, "runs")
    except sqlite3.Error:
        return False


def db_run_path(path: Path) -> tuple[Path, str] | None:
    """(database, run id) for ``mlflow.db/<run id>``, the name `find_logs` gives each run of a database; None for
    any other path."""
    if not path.exists() and is_mlflow_db(path.parent):
        return path.parent, path.name
    return None


def db_runs(path: Path) -> list[Path]:
    """``path/<run id>`` for each live run of an MLflow database that logged a metric, oldest first."""
    with closing(_connect(path)) as db:
        ids = db.execute(
            "SELECT run_uuid FROM runs WHERE coalesce(lifecycle_stage, 'active') != 'deleted' "
            "AND run_uuid IN (SELECT DISTINCT run_uuid FROM metrics) ORDER BY start_time, run_uuid"
        ).fetchall()
    return [path / str(run) for (run,) in ids]


def read_mlflow_log(path: str | Path) -> RawLog:
    """Read an MLflow run: a file-store run folder (or a folder holding one run), an ``mlflow.db`` holding one run,
    or ``mlflow.db/<run id>``.

    Raises:
        LogReadError: No run there, several (`keel.doctor.find_logs` lists them), a database that is not MLflow's,
            or a run with no metric value.
    """
    path = Path(path)
    db_run = db_run_path(path)
    if db_run is not None:
        return _read_db(path, *db_run)
    if path.is_file():
        if not is_mlflow_db(path):
            raise LogReadError(
                f"{path}: not an MLflow database (no metrics(key, value, timestamp, run_uuid, step, is_nan) table)"
            )
        runs = db_runs(path)
        if len(runs) != 1:
            _no_single_run(path, runs, " (mlflow.db/<run id>)")
        return _read_db(path, path, runs[0].name)
    runs = mlflow_runs(path)
    if len(runs) != 1:
        _no_single_run(path, runs, "")
    log = _read_folder(path, runs[0])
    if runs[0] != path:
        log.notes.insert(0, f"{path} holds one MLflow run, {runs[0].relative_to(path).as_posix()}: examined that")
    return log


def _no_single_run(path: Path, runs: list[Path], reads_one: str) -> None:
    if not runs:
        raise LogReadError(f"{path}: no MLflow run with metrics here (a run folder holds meta.yaml and metrics/)")
    raise LogReadError(several_runs_error(path, runs, "MLflow", reads_one))


def _read_folder(source: Path, run: Path) -> RawLog:
    metrics = run / "metrics"
    scalars = Scalars()
    malformed = 0
    files = sorted(f for f in metrics.rglob("*") if f.is_file() and not f.name.startswith("."))
    for rank, file in enumerate(files):
        key = file.relative_to(metrics).as_posix()
        # not read_text: an empty metric file is no error, and a line of garbage is one line skipped
        for order, line in enumerate(file.read_bytes().decode("utf-8", "replace").splitlines()):
            parsed = _metric_line(line)
            if parsed is None:
                malformed += bool(line.strip())
                continue
            timestamp, value, step = parsed
            scalars.add(timestamp, rank, order, step, key, value)
    log = _log(source, scalars, f"{run}: no metric value in metrics/")
    if malformed:
        log.notes.append(f"{malformed} metric line(s) that are not 'timestamp value [step]' skipped")
    return log


def _metric_line(line: str) -> tuple[float, float, int] | None:
    """(timestamp, value, step) of a file-store metric line; None when it is not one."""
    parts = line.split()
    if len(parts) not in (2, 3):
        return None
    try:
        timestamp, value = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    step = parse_step(parts[2]) if len(parts) == 3 else 0
    return None if step is None else (timestamp, value, step)


def _read_db(source: Path, db_path: Path, run: str) -> RawLog:
    scalars = Scalars()
    try:
        with closing(_connect(db_path)) as db:
            rows = db.execute(
                "SELECT timestamp, step, key, value, is_nan FROM metrics WHERE run_uuid = ? ORDER BY rowid", (run,)
            )
            keys: dict[str, int] = {}
            skipped = 0
            for order, (timestamp, step, key, value, is_nan) in enumerate(rows):
                step = parse_step(step)
                if not isinstance(key, str) or not isinstance(value, (int, float)) or step is None:
                    skipped += 1
                    continue
                if is_nan:
                    value = float("nan")
                elif abs(value) >= LARGEST:
                    value = float(np.copysign(np.inf, value))
                rank = keys.setdefault(key, len(keys))
                ts = float(timestamp) if isinstance(timestamp, (int, float)) else float("nan")
                scalars.add(ts, rank, order, step, key, float(value))
    except sqlite3.Error as exc:
        raise LogReadError(f"{db_path}: the MLflow database could not be read ({exc})") from None
    log = _log(source, scalars, f"{db_path}: run {run!r} logged no metric")
    if skipped:
        log.notes.append(f"{skipped} metric row(s) with a non-numeric value or step skipped")
    return log


def _log(source: Path, scalars: Scalars, empty: str) -> RawLog:
    if not len(scalars.steps):
        raise LogReadError(empty)
    log = RawLog(source=str(source), format="mlflow", step_column="step")
    log.records = scalars.records(by_step=True)
    _drop_trainer_summary(log)
    return log


def _drop_trainer_summary(log: RawLog) -> None:
    """Leave out the HF Trainer's end-of-training summary (logged once, with ``train_runtime``): its ``train_loss``
    is the mean loss of the whole run, read as a loss it would be a fake last point."""
    columns = log.records.columns
    if "train_runtime" not in columns:
        return
    summary = [name for name in (*SUMMARY_KEYS, *TRAINER_SUMMARY) if name in columns and len(columns[name].rows) == 1]
    for name in summary:
        del columns[name]
    log.notes.append(f"the HF Trainer's end-of-training summary left out ({', '.join(summary)})")


def _connect(path: Path) -> sqlite3.Connection:
    """A read-only connection: reading must never create, lock for writing or migrate the user's database."""
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
