"""`keel export` reads a run's signals from SQLite a step at a time (RunReader.signal_rows) instead of holding the
whole run: the rows, and so every exported byte, must be what the per-signal read gave, on any store.

Session 15 (reviewer W, W7): a 1M-step × 6-signal run took 679 MB to export (every step's dict held at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pty
import sys
import termios
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main as keel_main
from keel.store import RunReader, RunWriter
from keel.store.exporters import RunTable, csv, export_run, jsonl
from tests.store.test_untrusted_store import crafted_store


def rows_per_signal(run: Path, keys: list[str] | None = None) -> list[tuple[int, dict[str, float]]]:
    """The rows as `RunTable.read` built them before streaming: each signal read whole, merged by step."""
    with RunReader(run) as reader:
        by_step: dict[int, dict[str, float]] = {}
        for key in reader.signal_keys():
            if keys is None or key in keys:
                steps, values = reader.signal(key)
                for step, value in zip(steps.tolist(), values.tolist(), strict=True):
                    by_step.setdefault(step, {})[key] = value
        return sorted(by_step.items())


def same_rows(a: list[tuple[int, dict[str, float]]], b: list[tuple[int, dict[str, float]]]) -> bool:
    """Equal steps, keys in the same order, values equal bit for bit (NaN is NaN, -0.0 is not 0.0)."""
    return [(s, list(v)) for s, v in a] == [(s, list(v)) for s, v in b] and all(
        [repr(x) for x in va.values()] == [repr(x) for x in vb.values()] for (_, va), (_, vb) in zip(a, b, strict=True)
    )


def exported_bytes(table: RunTable, module, out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in module.export(table, out)}


# Values a signal row can hold in a store: NULL (a NaN), integers, any float (±inf, -0.0, subnormals), and values
# of the wrong type a crafted store holds (text, a blob), which are left out.
VALUES = st.one_of(
    st.none(),
    st.floats(allow_nan=False),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from(["2.5", b"\x00"]),
)
KEYS = st.sampled_from(["loss", "Loss", "grad/norm", "grad/norm/fc.weight", "ü/x", "a b", "=1+1"])
STEPS = st.one_of(st.integers(0, 40), st.integers(-(2**63), 2**63 - 1), st.sampled_from(["3", 2.0]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(STEPS, KEYS, VALUES), max_size=60), chosen=st.sets(KEYS, max_size=3))
def test_streamed_rows_are_the_per_signal_rows_and_export_the_same_bytes(tmp_path_factory, rows, chosen):
    # Rows in any order (a resumed run re-logs steps later in the file), a key logged twice at one step, signals
    # that start mid-run and gaps, values of the wrong type: the stream gives what the per-signal read gave.
    run = crafted_store(tmp_path_factory.mktemp("run"), {"signals": rows})
    expected = rows_per_signal(run)
    with RunReader(run) as reader:
        streamed = list(reader.signal_rows())
        subset = list(reader.signal_rows(sorted(chosen)))
    assert same_rows(streamed, expected)
    assert same_rows(subset, rows_per_signal(run, sorted(chosen)))
    table = RunTable.read(run)
    assert same_rows(list(table.rows), expected)
    listed = dataclasses.replace(table, rows=expected)  # the table as it was: every row in a list
    out = tmp_path_factory.mktemp("out")
    for module in (csv, jsonl):
        assert exported_bytes(table, module, out / "streamed") == exported_bytes(listed, module, out / "listed")


def test_rows_of_the_wrong_type_are_left_out_and_counted_as_the_per_signal_read_counts_them(tmp_path):
    run = crafted_store(tmp_path / "run", {"signals": [("7", "loss", 1.0), (3, "loss", "2.5"), (4, "loss", 4)]})
    with RunReader(run) as reader:
        assert list(reader.signal_rows()) == [(1, {"loss": 2.5}), (4, {"loss": 4.0})]
        streamed = reader.problems
    with RunReader(run) as reader:
        reader.signal("loss")
        first = "value is '2.5' (text); allowed: a number"
        assert streamed == reader.problems == [f"signals: 2 row(s) of the wrong type left out (first: {first})"]


def test_more_keys_than_one_sql_statement_takes_are_chosen_all_the_same(tmp_path):
    with RunWriter(tmp_path / "run") as writer:
        for step in range(3):
            writer.add_signals(step, {f"p/{i:04d}": float(i + step) for i in range(1200)})
    chosen = [f"p/{i:04d}" for i in range(0, 1200, 1)][:1100]  # past SQLite's 999 variables
    with RunReader(tmp_path / "run") as reader:
        rows = list(reader.signal_rows(chosen))
        assert [list(v) for _, v in rows] == [chosen] * 3 and rows[2][1]["p/0005"] == 7.0
        assert list(reader.signal_rows([])) == []


@pytest.mark.parametrize("fmt", ["tensorboard", pytest.param("mlflow", marks=pytest.mark.slow)])  # mlflow: 15 s
def test_tracker_exports_log_every_streamed_value(tmp_path, fmt):
    pytest.importorskip(fmt)
    run = tmp_path / "run"
    with RunWriter(run) as writer:
        for step in range(0, 2500, 1):  # more metrics than one MLflow batch (1000)
            writer.add_signals(step, {"loss": 1.0 / (step + 1), **({"eval/loss": -0.0} if step % 500 == 0 else {})})
    expected = {(s, k): v for s, values in rows_per_signal(run) for k, v in values.items()}
    if fmt == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        export_run(run, fmt, tmp_path / "tb")
        acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        got = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    else:
        from mlflow.tracking import MlflowClient

        export_run(run, fmt, tmp_path / "ml")
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ml'}/mlflow.db")
        [found] = client.search_runs([client.get_experiment_by_name("keel").experiment_id])
        got = {
            (m.step, key): m.value
            for key in ("loss", "eval/loss")
            for m in client.get_metric_history(found.info.run_id, key)
        }
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())


def test_export_memory_does_not_grow_with_the_run(tmp_path):
    # Peak Python allocations of a CSV export of a run 10 times as long stay about the same (they grew 10-fold:
    # every step's dict was held until the file was written).
    peaks = []
    for steps in (2_000, 20_000):
        run = tmp_path / f"run{steps}"
        with RunWriter(run) as writer:
            writer.add_series("loss", range(steps), [1.0] * steps)
            writer.add_series("grad/norm", range(0, steps, 2), [2.0] * (steps // 2))
        tracemalloc.start()
        try:
            export_run(run, "csv", tmp_path / f"out{steps}")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 2 * peaks[0], peaks


def run_with_stderr_on_a_terminal(argv: list[str], monkeypatch, capsys) -> tuple[str, str]:
    """`keel ...` in this process with stderr a pseudo-terminal, as in a shell: (its stdout, what the terminal got)."""
    main_fd, terminal_fd = pty.openpty()
    termios.tcsetwinsize(terminal_fd, (24, 100))  # a terminal of 100 columns (a new pseudo-terminal has none)
    try:
        with os.fdopen(terminal_fd, "w", closefd=False) as terminal:
            monkeypatch.setattr(sys, "stderr", terminal)
            assert keel_main(argv) == 0
            monkeypatch.undo()
        os.set_blocking(main_fd, False)
        seen = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(main_fd, 65536):
                seen += chunk
        return capsys.readouterr().out, seen.decode(errors="replace")
    finally:
        os.close(terminal_fd)
        os.close(main_fd)


def long_run(path: Path) -> Path:
    with RunWriter(path) as writer:
        writer.add_series("loss", range(5000), [1.0] * 5000)
    return path


def test_export_shows_progress_on_a_terminal_and_never_on_stdout(tmp_path, monkeypatch, capsys):
    run = long_run(tmp_path / "run")
    stdout, stderr = run_with_stderr_on_a_terminal(
        ["export", str(run), "--format", "jsonl", "--out", str(tmp_path / "o")], monkeypatch, capsys
    )
    assert "keel export jsonl" in stderr and "step" in stderr
    assert stdout.splitlines() == [
        str(tmp_path / "o" / n) for n in ("signals.jsonl", "findings.jsonl", "decisions.jsonl", "meta.json")
    ]


def test_export_quiet_shows_no_progress_on_a_terminal(tmp_path, monkeypatch, capsys):
    run = long_run(tmp_path / "run")
    _, stderr = run_with_stderr_on_a_terminal(
        ["export", str(run), "--format", "csv", "--out", str(tmp_path / "o"), "--quiet"], monkeypatch, capsys
    )
    assert stderr == ""


def test_export_shows_no_progress_when_stderr_is_not_a_terminal(tmp_path, capsys):
    run = long_run(tmp_path / "run")
    assert keel_main(["export", str(run), "--format", "csv", "--out", str(tmp_path / "o"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("[")


def test_a_store_with_no_signals_exports_a_header_only(tmp_path):
    with RunWriter(tmp_path / "run"):
        pass
    paths = export_run(tmp_path / "run", "csv", tmp_path / "o")
    assert paths[0].read_bytes() == b"step\r\n"
