"""`keel doctor` on a folder of runs shows a progress bar over them, on stderr and only on a terminal."""

from __future__ import annotations

from keel.cli import main as keel_main
from keel.store import RunWriter
from tests.store.test_export_streaming import run_with_stderr_on_a_terminal


def three_runs(root):
    for name in ("a", "b", "c"):
        with RunWriter(root / name) as writer:
            writer.add_series("loss", range(200), [2.0 + 0.01 * (i % 5) for i in range(200)])
    return str(root)


def test_doctor_over_a_folder_shows_progress_on_a_terminal_and_its_report_on_stdout(tmp_path, monkeypatch, capsys):
    out, seen = run_with_stderr_on_a_terminal(["doctor", three_runs(tmp_path)], monkeypatch, capsys)
    assert "keel doctor" in seen and "/3" in seen
    assert "3 runs in it" in out and out.count("no findings at warning or above") == 3  # each run's report
    assert all(f"{tmp_path / name} (keel_store" in out for name in "abc")
    assert "it/s" not in out and "/3 [" not in out  # the bar never reaches stdout


def test_doctor_quiet_and_a_non_terminal_show_none(tmp_path, monkeypatch, capsys):
    folder = three_runs(tmp_path)
    _, seen = run_with_stderr_on_a_terminal(["doctor", folder, "--quiet"], monkeypatch, capsys)
    assert seen == ""
    assert keel_main(["doctor", folder, "--json"]) == 0
    assert capsys.readouterr().err == ""
