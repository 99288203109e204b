"""`keel report` shows a progress bar over the stores and logs it reads, on stderr and only on a terminal."""

from __future__ import annotations

from keel.cli import main as keel_main
from keel.store import RunWriter
from tests.store.test_export_streaming import run_with_stderr_on_a_terminal


def two_runs(root):
    for name in ("a", "b"):
        with RunWriter(root / name) as writer:
            writer.add_series("loss", range(300), [1.0] * 300)
    (root / "train.csv").write_text("step,loss\n" + "".join(f"{i},{1 + i % 3}\n" for i in range(50)))
    return [str(root / "a"), str(root / "b"), str(root / "train.csv")]


def test_report_shows_progress_on_a_terminal_and_only_the_page_on_stdout(tmp_path, monkeypatch, capsys):
    runs = two_runs(tmp_path)
    out, seen = run_with_stderr_on_a_terminal(["report", *runs, "-o", str(tmp_path / "r.html")], monkeypatch, capsys)
    assert "keel report" in seen and "/4" in seen  # two stores, a log and the log's store
    assert out == f"{tmp_path / 'r.html'}\n"


def test_report_quiet_and_a_non_terminal_show_none(tmp_path, monkeypatch, capsys):
    runs = two_runs(tmp_path)
    _, seen = run_with_stderr_on_a_terminal(
        ["report", *runs, "-o", str(tmp_path / "r.html"), "--quiet"], monkeypatch, capsys
    )
    assert seen == ""
    assert keel_main(["report", *runs, "-o", str(tmp_path / "s.html")]) == 0
    assert capsys.readouterr().err == ""
