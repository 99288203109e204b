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
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from keel.doctor._folders import runs_below, several_runs_error
from keel.doctor.hf_log import SUMMARY_KEYS
from keel.doctor.log import LogReadError, RawLog, parse_step
from keel.doctor.store_log import is_sqlite
from keel.doctor.table import Scalars
from keel.store.schema import connect_for_reading

_DELETED = b"lifecycle_stage: deleted"
METRICS_COLUMNS = frozenset({"key", "value", "timestamp", "run_uuid", "step", "is_nan"})
LARGEST = sys.float_info.max  # what MLflow's database stores for +inf
TRAINER_SUMMARY = ("train_loss", "train_steps_per_second")  # with hf_log.SUMMARY_KEYS, logged once at the end


def is_mlflow_run(folder: Path) -> bool:
    """Whether ``folder`` is a live file-store run: ``meta.yaml`` and a ``metrics`` folder, and not deleted (MLflow
    marks a deleted run ``lifecycle_stage: deleted`` in its ``meta.yaml`` until ``mlflow gc`` removes it)."""
    meta = folder / "meta.yaml"
    if not (meta.is_file() and (folder / "metrics").is_dir()):
        return False
    try:
        with meta.open("rb") as fh:
            return _DELETED not in fh.read(1 << 16).splitlines()
    except OSError:
        return False


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
        data = file.read_bytes()  # not read_text: an empty metric file is no error, a garbage line one line skipped
        series = _whole_series(data)
        if series is None:
            series, bad = _series_by_line(data)
            malformed += bad
        scalars.extend(file.relative_to(metrics).as_posix(), rank, *series)
    log = _log(source, scalars, f"{run}: no metric value in metrics/")
    if malformed:
        log.notes.append(f"{malformed} metric line(s) that are not 'timestamp value [step]' skipped")
    return log


_Series = tuple[np.ndarray, np.ndarray, np.ndarray]  # timestamps, steps (int64), values
_OTHER_SPACE = (b"\t", b"\r", b"\x0b", b"\x0c")
_EXACT = 2**53  # a step read as a float64 is exact below this


def _whole_series(data: bytes) -> _Series | None:
    """A metric file's series parsed in one numpy call, when every line is ``timestamp value step`` as MLflow writes
    it (one space apart, each line ending in a newline) and every step an exact integer; None otherwise."""
    if not _as_mlflow_writes(data):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            numbers = np.fromstring(data, sep=" ")  # type: ignore[call-overload]
        except (ValueError, DeprecationWarning):  # a field that is not a number
            return None
    if len(numbers) != 3 * data.count(b"\n"):
        return None
    wall, values, steps = numbers.reshape(-1, 3).T
    if not np.all((np.abs(steps) < _EXACT) & (steps == np.trunc(steps))):
        return None
    return wall, steps.astype(np.int64), values


def _as_mlflow_writes(data: bytes) -> bool:
    """Whether every line of ``data`` is three fields one space apart, the last line ending in a newline: the
    separators, in order, are space, space, newline again and again, never two in a row, and there is no other
    whitespace (a C-speed check, for files of millions of lines)."""
    raw = np.frombuffer(data, np.uint8)
    at = np.flatnonzero((raw == 32) | (raw == 10))
    return (
        len(at) % 3 == 0
        and (not len(at) or at[-1] == len(raw) - 1)
        and bool(np.all(raw[at].reshape(-1, 3) == (32, 32, 10)))
        and bool(np.all(np.diff(at, prepend=-1) > 1))
        and not any(space in data for space in _OTHER_SPACE)
    )


def _series_by_line(data: bytes) -> tuple[_Series, int]:
    """A metric file's series line by line, and how many non-blank lines were not ``timestamp value [step]``."""
    points, malformed = [], 0
    for line in data.decode("utf-8", "replace").splitlines():
        parsed = _metric_line(line)
        if parsed is None:
            malformed += bool(line.strip())
        else:
            points.append(parsed)
    return _arrays(points), malformed


def _arrays(points: list[tuple[float, int, float]]) -> _Series:
    return (
        np.array([p[0] for p in points], np.float64),
        np.array([p[1] for p in points], np.int64),
        np.array([p[2] for p in points], np.float64),
    )


def _metric_line(line: str) -> tuple[float, int, float] | None:
    """(timestamp, step, value) of a file-store metric line; None when it is not one."""
    parts = line.split()
    if len(parts) not in (2, 3):
        return None
    try:
        timestamp, value = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    step = parse_step(parts[2]) if len(parts) == 3 else 0
    return None if step is None else (timestamp, step, value)


def _read_db(source: Path, db_path: Path, run: str) -> RawLog:
    scalars = Scalars()
    skipped = 0
    try:
        with closing(_connect(db_path)) as db:
            keys = db.execute(
                "SELECT key, count(*) FROM metrics WHERE run_uuid = ? GROUP BY key ORDER BY min(rowid)", (run,)
            ).fetchall()
            for rank, (key, count) in enumerate(keys):
                if not isinstance(key, str):
                    skipped += count
                    continue
                rows = db.execute(
                    "SELECT timestamp, step, value, is_nan FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY rowid",
                    (run, key),
                ).fetchall()
                series = _whole_rows(rows)
                if series is None:
                    series, bad = _rows_one_by_one(rows)
                    skipped += bad
                scalars.extend(key, rank, *series)
    except sqlite3.Error as exc:
        raise LogReadError(f"{db_path}: the MLflow database could not be read ({exc})") from None
    log = _log(source, scalars, f"{db_path}: run {run!r} logged no metric")
    if skipped:
        log.notes.append(f"{skipped} metric row(s) with a non-numeric value or step skipped")
    return log


def _whole_rows(rows: list[tuple[Any, ...]]) -> _Series | None:
    """A metric's (timestamp, step, value, is_nan) rows as arrays in one numpy call, NaN and ±inf as MLflow stores
    them turned back; None when a row holds text or a step that is not an exact integer."""
    if not rows:
        return _arrays([])
    try:
        table = np.array(rows, dtype=np.float64)
    except (ValueError, TypeError):
        return None
    wall, steps, values, is_nan = table.T
    if not np.all((np.abs(steps) < _EXACT) & (steps == np.trunc(steps))) or np.isnan(values).any():
        return None
    return wall, steps.astype(np.int64), _stored_to_float(values, is_nan != 0)


def _rows_one_by_one(rows: list[tuple[Any, ...]]) -> tuple[_Series, int]:
    """`_whole_rows` row by row, leaving out (and counting) the rows with text or no integer step."""
    points, skipped = [], 0
    for timestamp, raw_step, value, is_nan in rows:
        step = parse_step(raw_step)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or step is None:
            skipped += 1
            continue
        ts = float(timestamp) if isinstance(timestamp, (int, float)) else float("nan")
        points.append((ts, step, float(_stored_to_float(np.float64(value), np.bool_(bool(is_nan))))))
    return _arrays(points), skipped


def _stored_to_float(values: Any, is_nan: Any) -> Any:
    """MLflow's stored NaN (0 with ``is_nan``) and ±inf (±the largest double) back to NaN and ±inf."""
    values = np.where(is_nan, np.nan, values)
    return np.where(np.abs(values) >= LARGEST, np.copysign(np.inf, values), values)


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
    """A read-only connection that leaves the folder as it was: reading must never create, lock for writing or
    migrate the user's database, nor leave ``-shm``/``-wal`` files beside it (a ``mode=ro`` connection to a WAL
    database does: `keel report` left them in keel run folders, whose store it asked whether it was MLflow's)."""
    return connect_for_reading(path)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
