"""Bad input gives one clear error line and exit status 2, never a traceback."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from keel.cli import main

RNG_BYTES = bytes((i * 7919 + 13) % 256 for i in range(4096))  # deterministic binary garbage with NUL bytes


def _sqlite_other(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()


CASES = {
    "missing": (lambda d: d / "nope.csv", "no such file"),
    "unknown_format": (lambda d: _write(d / "train.log", "epoch 1 done\nall good\n"), "unknown log format"),
    "no_step_column": (lambda d: _write(d / "log.csv", "loss,lr\n2.0,0.1\n"), "no step column"),
    "empty_file": (lambda d: _write(d / "log.csv", ""), "empty"),
    "blank_file": (lambda d: _write(d / "log.jsonl", "\n  \n"), "empty"),
    "header_only": (lambda d: _write(d / "log.csv", "step,loss\n"), "no data rows"),
    "no_integer_steps": (lambda d: _write(d / "log.csv", "step,loss\nabc,1\n1.5,2\n"), "no row has an integer"),
    "binary_garbage": (lambda d: _write_bytes(d / "blob.bin", RNG_BYTES), "binary data"),
    "binary_named_csv": (lambda d: _write_bytes(d / "log.csv", RNG_BYTES), "binary data"),
    "not_utf8": (lambda d: _write_bytes(d / "log.csv", b"step,loss\n1,\xff\xfe\n"), "not UTF-8"),
    "garbage_event_file": (lambda d: _write_bytes(d / "events.out.tfevents.1", RNG_BYTES), "not a TensorBoard"),
    "garbage_with_sqlite_magic": (
        lambda d: _write_bytes(d / "run.sqlite", b"SQLite format 3\x00" + RNG_BYTES),
        "not a keel run store",
    ),
    "other_sqlite": (lambda d: (_sqlite_other(d / "x.sqlite"), d / "x.sqlite")[1], "not a keel run store"),
    "empty_folder": (lambda d: d, "no training log"),
    "folder_holding_one_broken_run": (  # the one run a folder holds is read (tests/doctor/test_run_folders.py)
        lambda d: (_write_bytes(_folder(d / "runs" / "bare") / "run.sqlite", RNG_BYTES), d / "runs")[1],
        "not a keel run store",
    ),
    "json_object_not_a_log": (lambda d: _write(d / "config.json", json.dumps({"lr": 1}, indent=2)), "not a log"),
    "state_without_history": (
        lambda d: _write(d / "trainer_state.json", json.dumps({"global_step": 3})),
        "no 'log_history'",
    ),
    "state_empty_history": (lambda d: _write(d / "trainer_state.json", json.dumps({"log_history": []})), "empty"),
    "jsonl_without_steps": (lambda d: _write(d / "log.jsonl", '{"loss": 1}\n{"loss": 2}\n'), "no log object"),
    "truncated_json_array": (lambda d: _write(d / "log.json", '[{"step": 1, "loss": '), "not valid JSON"),
}


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    make, expected = CASES[case]
    path = make(tmp_path)
    assert main(["doctor", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keel doctor: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_forced_wrong_format_is_a_clean_error(tmp_path, capsys):
    path = _write(tmp_path / "log.csv", "step,loss\n1,2\n")
    assert main(["doctor", str(path), "--format", "tensorboard"]) == 2
    assert "not a TensorBoard event file" in capsys.readouterr().err


def test_unknown_format_name_is_rejected_by_the_parser(tmp_path, capsys):
    try:  # keel.cli answers argparse's refusal with exit status 2 (returned, or raised by argparse itself)
        code = main(["doctor", str(tmp_path), "--format", "parquet"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert "invalid choice: 'parquet'" in capsys.readouterr().err


def test_the_process_prints_no_traceback(tmp_path):
    garbage = _write_bytes(tmp_path / "blob.dat", RNG_BYTES)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "keel.cli", "doctor", str(garbage)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("keel doctor: error: ") and proc.stderr.count("\n") == 1


def test_doctor_imports_no_torch():
    # CI machines that only lint logs should not need torch loaded (or installed at all, one day).
    code = (
        "import sys; from keel.cli import main; "
        f"main(['doctor', {str(Path(__file__).parent / 'data' / 'tb_simple')!r}, '--json']); "
        "print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stderr
