"""W&B run files and MLflow runs (file store and SQLite), read from what wandb 0.31 and mlflow 3.17 themselves wrote
(tests/doctor/data/make_tracker_fixtures.py), then hostile variants of them: one clear `LogReadError` naming the
file, or a read with a note, never a traceback."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import LogReadError, detect_format, examine_log, find_logs, read_log
from keel.doctor._protobuf import WireError
from keel.doctor.mlflow_log import _rows_one_by_one, _series_by_line, _whole_rows, _whole_series
from keel.doctor.table import Scalars
from keel.doctor.tensorboard_log import _scalars, _scalars_fields
from keel.doctor.wandb_log import _Framing, iter_records
from tests.doctor.wire import (
    LENGTH,
    VARINT,
    WANDB_BLOCK,
    WANDB_HEADER,
    field,
    scalar_event,
    wandb_chunk,
    wandb_file,
    wandb_history,
)

DATA = Path(__file__).parent / "data"
WANDB_RUNS = DATA / "wandb_runs" / "wandb"
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _run(run_id: str, nth: int = 0) -> Path:
    """The ``nth`` run folder of ``run_id`` in the W&B fixture (a resumed run has two)."""
    return sorted(WANDB_RUNS.glob(f"*-{run_id}"))[nth]


def _run_file(run_id: str, nth: int = 0) -> Path:
    return next(_run(run_id, nth).glob("*.wandb"))


def _values(log, column):
    col = log.records.columns[column]
    return dict(zip(log.records.steps[col.rows].tolist(), col.values.tolist(), strict=True))


def _same(a, b) -> bool:
    """Two tables hold the same records, NaN equal to NaN."""
    return (
        a.steps.tolist() == b.steps.tolist()
        and list(a.columns) == list(b.columns)
        and all(
            np.array_equal(a.columns[n].rows, b.columns[n].rows)
            and np.array_equal(a.columns[n].values, b.columns[n].values, equal_nan=True)
            for n in a.columns
        )
    )


def _copy(src: Path, tmp_path: Path, data: bytes | None = None) -> Path:
    dest = tmp_path / src.name
    dest.write_bytes(src.read_bytes() if data is None else data)
    return dest


def _doctor(capsys, *args):
    code = main(["doctor", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# --- W&B: real files ---------------------------------------------------------------------------------------------


def test_a_wandb_run_file_is_read_with_its_nan_inf_unicode_and_sparse_eval(tmp_path):
    log = read_log(_run_file("basic01"))
    assert log.format == "wandb" and log.step_column == "_step"
    assert log.records.steps.tolist() == list(range(200))
    loss = _values(log, "train/loss")
    assert math.isnan(loss[50]) and loss[60] == math.inf and loss[0] == 2.0
    assert sorted(_values(log, "eval/loss")) == [0, 50, 100, 150]
    assert _values(log, "ünï/kéy")[199] == 199
    assert not any(name.startswith("_") or "._" in name for name in log.records.columns)  # W&B's bookkeeping
    assert any("lists or objects" in n for n in log.notes)  # the histogram at step 0
    assert log.meta == {"run_id": "basic01", "exit_code": 0}


def test_a_wandb_run_is_the_same_read_from_its_file_its_folder_or_a_wandb_folder_of_one(tmp_path):
    (tmp_path / "wandb").mkdir()
    shutil.copytree(_run("basic01"), tmp_path / "wandb" / _run("basic01").name)
    (tmp_path / "wandb" / "latest-run").symlink_to(tmp_path / "wandb" / _run("basic01").name)
    by_file = read_log(_run_file("basic01")).records
    for path in (_run("basic01"), tmp_path / "wandb", tmp_path):
        assert detect_format(path) == "wandb"
        assert find_logs(path) == [path]  # latest-run is a second name, not a second run
        log = read_log(path)
        assert _same(log.records, by_file)
    assert any("holds one W&B run" in n for n in read_log(tmp_path).notes)


def test_keel_doctor_on_a_wandb_folder_examines_each_run(capsys):
    assert [p.name.rsplit("-", 1)[1] for p in find_logs(WANDB_RUNS)] == ["basic01", "res01", "kill01"]
    with pytest.raises(LogReadError, match="a folder of 3 W&B runs"):
        read_log(WANDB_RUNS)
    code, out, _ = _doctor(capsys, WANDB_RUNS, "--all")
    assert code == 0 and "3 runs in it" in out
    assert out.count("(wandb, ") == 3
    assert "non_finite" in out  # basic01's NaN


def test_a_resumed_wandb_run_is_read_with_its_later_folder_and_the_resume_is_a_restart():
    """wandb.init(id="res01") logged 0..99; wandb.init(id="res01", resume="allow") a second folder with 80..149."""
    first_file, second_file = read_log(_run_file("res01", 0)), read_log(_run_file("res01", 1))
    assert first_file.records.steps.tolist() == list(range(100))  # a file is read alone
    assert second_file.records.steps.tolist() == list(range(80, 150))
    for folder in (_run("res01", 0), _run("res01", 1)):  # either folder stands for the whole run
        log = read_log(folder)
        assert log.records.steps.tolist() == list(range(100)) + list(range(80, 150))
        assert any("was resumed: its 2 folders read in turn" in n for n in log.notes)
    result = examine_log(_run("res01", 0))
    assert result.summary["restarts"]["count"] == 1
    assert (result.summary["first_step"], result.summary["last_step"]) == (0, 149)


def test_a_wandb_run_killed_mid_run_is_read_to_its_last_whole_record_and_says_so(tmp_path):
    log = read_log(_run_file("kill01"))
    assert log.records.steps.tolist() == list(range(len(log.records)))
    assert len(log.records) > 300
    assert any("no exit record" in n for n in log.notes)
    data = _run_file("kill01").read_bytes()
    cut = read_log(_copy(_run_file("kill01"), tmp_path, data[: WANDB_BLOCK + 5000]))
    assert 0 < len(cut.records) < len(log.records)
    assert cut.records == log.records[: len(cut.records)]  # no NaN in this run
    assert any("cut-off record" in n for n in cut.notes)


def test_the_trainers_wandb_run_is_stepped_by_global_step_with_its_signals_mapped():
    result = examine_log(DATA / "wandb_hf")
    summary = result.summary
    assert result.format == "wandb" and (summary["first_step"], summary["last_step"]) == (1, 30)
    signals = summary["signals"]
    assert signals["loss"]["column"] == "train/loss" and signals["loss"]["observations"] == 30
    assert signals["grad/norm"]["column"] == "train/grad_norm"
    assert signals["lr"]["column"] == "train/learning_rate"
    assert signals["val/loss"]["column"] == "eval/loss" and signals["val/loss"]["observations"] == 3
    assert read_log(DATA / "wandb_hf").step_column == "train/global_step"  # not W&B's own log-call counter
    assert summary["restarts"]["count"] == 0  # the eval rows at steps 10/20/30 are merged, not restarts


def test_our_framing_of_the_records_rebuilds_wandbs_file_byte_for_byte():
    data = _run_file("basic01").read_bytes()
    assert wandb_file(list(iter_records(data, _Framing()))) == data


# --- W&B: hostile files -------------------------------------------------------------------------------------------

_ROWS = [wandb_history(step, {"loss": str(2.0 - step / 100), "grad_norm": "1.0"}) for step in range(40)]


def _hostile_wandb(case: str) -> bytes:
    real = _run_file("basic01").read_bytes()
    if case == "empty":
        return b""
    if case == "wrong magic":
        return b":WAB" + real[4:]
    if case == "text file":
        return b"step,loss\n1,2\n"
    if case == "header only":
        return WANDB_HEADER
    if case == "first chunk crc":
        return real[:7] + b"\x00\x00\x00\x00" + real[11:]
    if case == "zeros after header":
        return WANDB_HEADER + bytes(WANDB_BLOCK)
    if case == "no history":
        return wandb_file([field(17, LENGTH, field(1, LENGTH, b"run1"))])
    if case == "history with no step anywhere":
        return wandb_file([field(2, LENGTH, field(1, LENGTH, field(1, LENGTH, b"loss") + field(16, LENGTH, b"1")))])
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "not a W&B run file"),
        ("wrong magic", "not a W&B run file"),
        ("text file", "not a W&B run file"),
        ("header only", "logged no history"),
        ("first chunk crc", "bad checksum in its first record"),
        ("zeros after header", "logged no history"),
        ("no history", "logged no history"),
    ],
)
def test_hostile_wandb_files_are_one_clear_error_naming_the_file(case, message, tmp_path, capsys):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(_hostile_wandb(case))
    with pytest.raises(LogReadError, match=message) as err:
        read_log(path, format="wandb")
    assert str(path) in str(err.value)
    code, out, errout = _doctor(capsys, path, "--format", "wandb")
    assert code == 2 and errout.count("\n") == 1 and "Traceback" not in errout


def test_history_rows_with_no_step_at_all_are_one_clear_error(tmp_path):
    path = tmp_path / "run-x.wandb"  # wandb writes "step {}" for step 0: a row with neither it nor _step has none
    path.write_bytes(_hostile_wandb("history with no step anywhere"))
    with pytest.raises(LogReadError, match="no history row has a step"):
        read_log(path)
    path.write_bytes(wandb_file([*_ROWS, field(2, LENGTH, field(1, LENGTH, field(1, LENGTH, b"loss")))]))
    assert any("1 history row(s) without an integer _step" in n for n in read_log(path).notes)


def test_a_corrupt_chunk_mid_file_skips_its_block_and_reads_on(tmp_path):
    rows = [wandb_history(step, {"loss": "2.0", "pad": '"' + "x" * 900 + '"'}) for step in range(120)]
    data = bytearray(wandb_file(rows))
    data[WANDB_BLOCK + 100] ^= 0xFF  # inside a chunk of the second block
    log = read_log(_copy(Path("run-x.wandb"), tmp_path, bytes(data)))
    steps = log.records.steps.tolist()
    assert 0 < len(steps) < 120 and steps == sorted(steps) and steps[-1] == 119
    assert any("bad checksum" in n for n in log.notes)


@pytest.mark.parametrize(
    ("name", "record", "expect"),
    [
        ("huge varint step", field(2, LENGTH, field(2, LENGTH, b"\x08" + b"\xff" * 11)), "malformed"),
        ("history of the wrong wire type", field(2, VARINT, 5), "malformed"),
        ("item key not UTF-8", field(2, LENGTH, field(1, LENGTH, field(2, LENGTH, b"\xff\xfe"))), "malformed"),
        ("NaN strings", wandb_history(3, {"loss": '"nan"', "lr": "NaN", "gn": "-Infinity"}), None),
        ("a step beyond 2**61", wandb_history(2**62, {"loss": "1"}), "without an integer"),
        ("value_json not JSON", wandb_history(3, {"loss": "{oops", "lr": "0.1"}), None),
        ("a list value", wandb_history(3, {"loss": "[1, 2]", "lr": "0.1"}), "lists or objects"),
        ("deep JSON", wandb_history(3, {"loss": "[" * 100_000 + "]" * 100_000, "lr": "0.1"}), None),
    ],
)
def test_hostile_wandb_records_are_skipped_and_noted(name, record, expect, tmp_path):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(wandb_file([*_ROWS, record]))
    log = read_log(path)
    assert log.records.steps.tolist()[:40] == list(range(40))
    if expect:
        assert any(expect in n for n in log.notes), log.notes
    if name == "NaN strings":
        assert math.isnan(_values(log, "lr")[3]) and _values(log, "gn")[3] == -math.inf
        assert math.isnan(_values(log, "loss")[3])  # parse_number reads the text "nan" too


def test_a_unicode_escape_key_is_kept_and_shown_escaped(tmp_path, capsys):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(wandb_file([wandb_history(s, {"lo\x1bss": "1.0", "ключ/λ": "2"}) for s in range(3)]))
    log = read_log(path)
    assert set(log.records.columns) == {"lo\x1bss", "ключ/λ"}
    _, out, _ = _doctor(capsys, path, "--all")
    assert "\x1b" not in out


@FUZZ
@given(data=st.binary(max_size=3000), cut=st.integers(0, 100_000))
def test_any_bytes_after_a_wandb_header_or_any_cut_of_a_real_file_read_or_fail_cleanly(data, cut, tmp_path):
    real = _run_file("basic01").read_bytes()
    for content in (WANDB_HEADER + data, real[:cut], real[:cut] + data):
        path = tmp_path / "run-x.wandb"
        path.write_bytes(content)
        try:
            log = read_log(path, format="wandb")
        except LogReadError as exc:
            assert str(path) in str(exc)
        else:
            assert len(log.records) > 0


@FUZZ
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 2**40),
            st.dictionaries(
                st.text(alphabet="abcdeλé/ -", min_size=1, max_size=12),  # no step column's name ("iter", "step")
                st.floats(allow_nan=False, width=64),
                min_size=1,
                max_size=4,
            ),
        ),
        min_size=1,
        max_size=30,
    ),
    nested=st.booleans(),
)
def test_history_rows_round_trip_through_a_wandb_file(rows, nested, tmp_path):
    records = [
        wandb_history(step, {k: json.dumps(v) for k, v in values.items()}, nested=nested) for step, values in rows
    ]
    path = tmp_path / "run-x.wandb"
    path.write_bytes(wandb_file(records))
    log = read_log(path)
    assert list(log.records) == [(step, {k: float(v) for k, v in values.items()}) for step, values in rows]


def test_a_chunk_longer_than_its_block_is_corrupt_not_a_read_past_the_block(tmp_path):
    good = wandb_file(_ROWS)
    bogus = wandb_chunk(1, b"\x00" * 10)[:4] + struct.pack("<H", 0xFFFF) + b"\x01"
    path = _copy(Path("run-x.wandb"), tmp_path, good + bogus + bytes(100))
    log = read_log(path)
    assert log.records.steps.tolist() == list(range(40))


# --- MLflow: real stores ------------------------------------------------------------------------------------------

MLRUNS = DATA / "mlruns"


def _mlflow_run(metric: str) -> Path:
    return next(run for run in MLRUNS.glob("*/*") if (run / "metrics" / metric).is_file())


def _mlflow_db(tmp_path: Path, extra: str = "") -> Path:
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.executescript("BEGIN;\n" + (DATA / "mlflow_hf.sql").read_text() + extra + "COMMIT;\n")  # one commit: fast
    con.close()
    return db


def test_an_mlflow_file_store_run_is_read_with_nan_inf_and_a_metric_logged_with_no_step():
    run = _mlflow_run("train/loss")
    log = read_log(run)
    assert log.format == "mlflow" and log.records.steps.tolist() == list(range(100))
    loss = _values(log, "train/loss")
    assert math.isnan(loss[40]) and loss[41] == math.inf and loss[0] == 2.0
    assert _values(log, "eval_loss") == {0: 1.5}  # mlflow.log_metric without a step logs step 0


def test_mlruns_an_experiment_and_a_project_folder_stand_for_their_runs(tmp_path, capsys):
    experiment = _mlflow_run("loss").parent
    shutil.copytree(MLRUNS, tmp_path / "mlruns")
    (tmp_path / "mlruns" / ".trash" / "deadbeef" / "metrics").mkdir(parents=True)  # deleted: not a run
    (tmp_path / "mlruns" / ".trash" / "deadbeef" / "meta.yaml").touch()
    for folder in (MLRUNS, experiment, tmp_path, tmp_path / "mlruns"):
        assert detect_format(folder) == "mlflow"
        assert len(find_logs(folder)) == 2
    with pytest.raises(LogReadError, match="a folder of 2 MLflow runs"):
        read_log(experiment)
    code, out, _ = _doctor(capsys, tmp_path, "--all")
    assert code == 0 and "2 runs in it" in out and "non_finite" in out


def test_the_trainers_mlflow_database_is_read_read_only_with_its_signals_mapped(tmp_path):
    db = _mlflow_db(tmp_path)
    before = db.read_bytes(), os.stat(db).st_mtime_ns
    assert detect_format(db) == "mlflow" and find_logs(db) == [db]  # one run: the file itself
    result = examine_log(db)
    signals = result.summary["signals"]
    assert (result.summary["first_step"], result.summary["last_step"]) == (1, 30)
    assert signals["loss"]["column"] == "loss" and signals["loss"]["observations"] == 30
    assert signals["grad/norm"]["column"] == "grad_norm" and signals["lr"]["column"] == "learning_rate"
    assert signals["val/loss"]["column"] == "eval_loss"
    assert "train_loss" not in signals  # the end-of-training mean loss, not a point of the curve
    assert (db.read_bytes(), os.stat(db).st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no journal, no WAL left behind


def test_an_mlflow_database_of_several_runs_names_each_and_reads_nan_and_inf_as_mlflow_stores_them(tmp_path):
    run = "0123456789abcdef0123456789abcdef"
    extra = (
        f"INSERT INTO runs (run_uuid, name, status, start_time, lifecycle_stage, experiment_id) "
        f"VALUES ('{run}', 'b', 'FINISHED', 9999999999999, 'active', 0);\n"
        + "".join(
            f"INSERT INTO metrics VALUES ('loss', {v}, {1000 + s}, '{run}', {s}, {n});\n"
            for s, v, n in [(0, 2.0, 0), (1, 0.0, 1), (2, 1.7976931348623157e308, 0), (3, -1.7976931348623157e308, 0)]
        )
    )
    db = _mlflow_db(tmp_path, extra)
    runs = find_logs(db)
    assert len(runs) == 2 and runs[1] == db / run
    with pytest.raises(LogReadError, match="a folder of 2 MLflow runs"):
        read_log(db)
    loss = _values(read_log(db / run), "loss")
    assert loss[0] == 2.0 and math.isnan(loss[1]) and loss[2] == math.inf and loss[3] == -math.inf


# --- MLflow: hostile stores ---------------------------------------------------------------------------------------


def _store_with(tmp_path: Path, metric_files: dict[str, str]) -> Path:
    run = tmp_path / "mlruns" / "1" / "abc"
    (run / "metrics").mkdir(parents=True)
    (run / "meta.yaml").write_text("run_id: abc\n")
    for name, text in metric_files.items():
        (run / "metrics" / name).parent.mkdir(parents=True, exist_ok=True)
        (run / "metrics" / name).write_text(text)
    return run


@pytest.mark.parametrize(
    ("files", "steps", "note"),
    [
        ({"loss": "1 2.0 0\n2 garbage 1\n3 1.9 2\n"}, [0, 2], "not 'timestamp value [step]'"),
        ({"loss": "1 2.0\n"}, [0], None),  # MLflow before 1.0: no step, read as step 0 as MLflow does
        ({"loss": "1 nan 0\n2 inf 1\n3 -inf 2\n4 NaN 3\n"}, [0, 1, 2, 3], None),
        ({"loss": "1 2.0 99999999999999999999\n2 1.0 1\n"}, [1], "not 'timestamp value [step]'"),
        ({"loss": "1 2.0 1.5\n2 1.0 1\n"}, [1], "not 'timestamp value [step]'"),
        ({"lösš/ключ": "1 2.0 0\n"}, [0], None),
        ({"loss": "\n\n1 2.0 0 extra\n5 1.0 3\n"}, [3], "not 'timestamp value [step]'"),
    ],
)
def test_hostile_mlflow_metric_lines_are_skipped_and_noted(files, steps, note, tmp_path):
    log = read_log(_store_with(tmp_path, files))
    assert log.records.steps.tolist() == steps
    assert (note is None) == (not log.notes) and all(note in n for n in log.notes if note)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no metric value"),
        ({"loss": ""}, "no metric value"),
        ({"loss": "garbage\n"}, "no metric value"),
        ({"loss": "\x00\x01\x02binary"}, "binary|no metric value"),
    ],
)
def test_an_mlflow_run_with_no_usable_metric_is_one_clear_error(files, message, tmp_path, capsys):
    run = _store_with(tmp_path, files)
    with pytest.raises(LogReadError, match=message):
        read_log(run)
    code, _, err = _doctor(capsys, run)
    assert code == 2 and err.count("\n") == 1 and str(run) in err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no runs", "no MLflow run with metrics"),
        ("text values", "logged no metric"),
        ("truncated", "keel run store|not an MLflow database|could not be read|unknown log format"),
        ("a keel store is not mlflow", "not an MLflow database"),
    ],
)
def test_hostile_mlflow_databases_are_one_clear_error(case, message, tmp_path, capsys):
    if case == "no runs":
        db = _mlflow_db(tmp_path, "DELETE FROM metrics;")
    elif case == "text values":
        db = _mlflow_db(tmp_path, "UPDATE metrics SET value = 'x', step = 'y';")
    elif case == "truncated":
        db = _mlflow_db(tmp_path)
        db.write_bytes(db.read_bytes()[:5000])
    else:
        db = tmp_path / "run.sqlite"
        sqlite3.connect(db).execute("CREATE TABLE signals (step INTEGER)").connection.close()
    fmt = ("--format", "mlflow") if case == "a keel store is not mlflow" else ()
    code, _, err = _doctor(capsys, db, *fmt)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


@FUZZ
@given(
    series=st.dictionaries(
        st.sampled_from(["loss", "grad_norm", "lr", "eval/loss"]),
        st.lists(st.tuples(st.integers(0, 10**6), st.floats(allow_nan=False)), min_size=1, max_size=20),
        min_size=1,
    ),
    junk=st.lists(st.text(max_size=30), max_size=5),
)
def test_any_metric_file_reads_every_value_at_its_step_or_fails_cleanly(series, junk, tmp_path):
    files = {
        key: "".join(f"{t} {v!r} {s}\n" for t, (s, v) in enumerate(points)) + "".join(j + "\n" for j in junk)
        for key, points in series.items()
    }
    shutil.rmtree(tmp_path / "mlruns", ignore_errors=True)
    try:
        log = read_log(_store_with(tmp_path, files))
    except LogReadError as exc:
        assert "mlruns" in str(exc)
        return
    for key, points in series.items():
        got = sorted(
            (s, v)
            for s, v in zip(
                log.records.steps[log.records.columns[key].rows].tolist(),
                log.records.columns[key].values.tolist(),
                strict=True,
            )
        )
        assert [p for p in got if p in set(points)] == sorted(points)


# --- slow: wandb and mlflow themselves ----------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_written_now_by_wandb_and_mlflow_are_read(tmp_path):
    """The fixtures' writer, run again with the installed wandb and mlflow (catches a format change)."""
    import subprocess
    import sys

    script = DATA / "make_tracker_fixtures.py"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_ALLOW_FILE_STORE="true")
    subprocess.run([sys.executable, script, "wandb", "basic", str(tmp_path / "wb")], env=env, check=True)
    subprocess.run([sys.executable, script, "mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}"], env=env, check=True)
    subprocess.run([sys.executable, script, "mlflow", (tmp_path / "mlruns").as_uri()], env=env, check=True)
    wb = read_log(tmp_path / "wb")
    assert wb.records.steps.tolist() == list(range(200)) and math.isnan(_values(wb, "train/loss")[50])
    for store in (tmp_path / "mlflow.db", tmp_path / "mlruns"):
        runs = find_logs(store)
        assert len(runs) == 2
        loss = _values(read_log(runs[0]), "train/loss")
        assert math.isnan(loss[40]) and loss[41] == math.inf


# --- the array fast paths agree with the value-by-value ones -------------------------------------------------------


def _loop_records(scalars: Scalars, by_step: bool) -> list:
    """`Scalars.records` as the loop over every value computes it (the path taken when a tag repeats at a step)."""
    keys = [np.frombuffer(scalars.order, np.int64), np.frombuffer(scalars.rank, np.int64)]
    keys.append(np.frombuffer(scalars.wall, np.float64))
    if by_step:
        keys.append(np.frombuffer(scalars.steps, np.int64))
    names, records, current, last = list(scalars.tags), [], {}, None
    for i in np.lexsort(keys).tolist():
        step, name, value = scalars.steps[i], names[scalars.tag[i]], scalars.value[i]
        if step == last and name not in current:
            current[name] = value
        else:
            if last is not None:
                records.append((last, current))
            last, current = step, {name: value}
    return [*records, (last, current)]


@FUZZ
@given(
    points=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(["a", "b", "c"]), st.integers(-3, 3), st.floats(-9, 9)),
        min_size=1,
        max_size=40,
    ),
    by_step=st.booleans(),
)
def test_scalars_records_built_with_arrays_equal_the_loop(points, by_step):
    scalars = Scalars()
    for order, (wall, tag, step, value) in enumerate(points):
        scalars.add(float(wall), 0, order, step, tag, value)
    assert list(scalars.records(by_step=by_step)) == _loop_records(scalars, by_step)


@FUZZ
@given(
    points=st.lists(
        st.tuples(st.integers(0, 2**45), st.floats(allow_nan=False) | st.just(math.nan), st.integers(-(2**52), 2**52)),
        max_size=30,
    )
)
def test_a_metric_file_parsed_whole_equals_it_parsed_line_by_line(points):
    data = "".join(f"{t} {v!r} {s}\n" for t, v, s in points).encode()
    whole = _whole_series(data)
    assert whole is not None
    by_line, malformed = _series_by_line(data)
    assert malformed == 0
    for a, b in zip(whole, by_line, strict=True):
        assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize(
    "text",
    ["1 2.0\n", "1 2.0 3\n1 2.0 3 4\n", "1 2.0 3", "1  2.0 3\n", "1\t2.0 3\n", "1 2.0 3\r\n", "1 x 3\n", "1 2 3.5\n"],
)
def test_a_metric_file_not_as_mlflow_writes_it_takes_the_line_by_line_path(text):
    assert _whole_series(text.encode()) is None


@FUZZ
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 2**45),
            st.integers(-(2**52), 2**52),
            st.floats(allow_nan=False) | st.sampled_from([1.7976931348623157e308, -1.7976931348623157e308]),
            st.integers(0, 1),
        ),
        max_size=30,
    )
)
def test_database_rows_read_whole_equal_them_read_one_by_one(rows):
    whole = _whole_rows(rows)
    assert whole is not None
    one_by_one, skipped = _rows_one_by_one(rows)
    assert skipped == 0
    for a, b in zip(whole, one_by_one, strict=True):
        assert np.array_equal(a, b, equal_nan=True)


def test_a_run_wandb_marks_resumed_says_its_file_holds_only_the_steps_since(tmp_path):
    """Online, wandb's RunRecord carries ``resumed`` and ``starting_step`` (offline runs leave them unset)."""
    run = field(17, LENGTH, field(1, LENGTH, b"res01") + field(14, VARINT, 80) + field(18, VARINT, 1))
    path = tmp_path / "run-res01.wandb"
    path.write_bytes(wandb_file([run, *(wandb_history(s, {"loss": "1.0"}) for s in range(80, 90))]))
    log = read_log(path)
    assert log.meta == {"run_id": "res01", "starting_step": 80, "resumed": True}
    assert any("a resumed run (from step 80)" in n for n in log.notes)


def test_a_run_folder_with_only_its_summary_says_the_summary_is_not_a_history(tmp_path, capsys):
    run = tmp_path / "wandb" / "run-20250101_120000-abc"
    (run / "files").mkdir(parents=True)
    (run / "files" / "wandb-summary.json").write_text('{"loss": 1.2, "_step": 999}')
    with pytest.raises(LogReadError, match="wandb-summary.json holds only the last values"):
        read_log(run, format="wandb")


def test_lightnings_wandb_logger_is_stepped_by_trainer_global_step(tmp_path):
    """Lightning's WandbLogger logs ``trainer/global_step`` beside the metrics; W&B's ``_step`` counts log calls."""
    rows = [
        wandb_history(i, {"_step": str(i), "trainer/global_step": str(10 * i), "train_loss_step": "2.0"})
        for i in range(5)
    ]
    path = tmp_path / "run-x.wandb"
    path.write_bytes(wandb_file(rows))
    log = read_log(path)
    assert log.step_column == "trainer/global_step" and log.records.steps.tolist() == [0, 10, 20, 30, 40]


def test_deleted_mlflow_runs_are_not_read(tmp_path):
    """``mlflow.delete_run`` marks a run deleted (file store: in its meta.yaml; database: ``lifecycle_stage``)."""
    shutil.copytree(MLRUNS, tmp_path / "mlruns")
    run = next(p for p in (tmp_path / "mlruns").glob("*/*") if (p / "metrics" / "loss").is_file())
    meta = run / "meta.yaml"
    meta.write_text(meta.read_text().replace("lifecycle_stage: active", "lifecycle_stage: deleted"))
    assert find_logs(tmp_path / "mlruns") == [tmp_path / "mlruns"]  # one live run left: the folder stands for it
    assert "train/loss" in read_log(tmp_path / "mlruns").records.columns
    run_b = "0123456789abcdef0123456789abcdef"
    db = _mlflow_db(
        tmp_path,
        f"INSERT INTO runs (run_uuid, name, status, start_time, lifecycle_stage, experiment_id) "
        f"VALUES ('{run_b}', 'b', 'FINISHED', 1, 'deleted', 0);\n"
        f"INSERT INTO metrics VALUES ('loss', 1.0, 1, '{run_b}', 0, 0);\n",
    )
    assert find_logs(db) == [db] and read_log(db).records.steps.tolist()[0] == 1  # the live HF run only


@FUZZ
@given(
    step=st.integers(-(2**62), 2**62),
    tag=st.text(max_size=140),
    value=st.floats(width=32),
    wall=st.floats(allow_nan=False) | st.just(0.0),
    cut=st.integers(0, 400),
)
def test_an_add_scalar_event_read_at_fixed_offsets_equals_the_generic_field_walk(step, tag, value, wall, cut):
    event = scalar_event(step, tag, value, wall)
    for payload in (event, event[:cut], event + b"\x08\x01"):  # whole, cut short, a field after the summary
        try:
            expected = _scalars_fields(payload)
        except (WireError, struct.error):
            expected = "malformed"
        try:
            got = _scalars(payload)
        except (WireError, struct.error):
            got = "malformed"
        assert repr(got) == repr(expected)  # repr: NaN equal to NaN
