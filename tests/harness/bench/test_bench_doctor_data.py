"""Where `keel bench doctor` finds the labelled real-run logs when ``--data`` is not given: ``$KEEL_REALRUNS``,
then keel's workspace folder ``../shared/data/realruns``; without either, one error line saying what it needs —
so an installed keel, run from any folder, either works or says how to make it work."""

from __future__ import annotations

import json

import pytest

from keel.cli import main
from keel.harness.bench.doctor import DATA_ENV


def _labelled(folder):
    folder.mkdir(parents=True)
    (folder / "healthy.csv").write_text("step,loss\n" + "".join(f"{s},{2.0 + 0.01 * (s % 3)}\n" for s in range(60)))
    (folder / "labels.json").write_text(json.dumps({"series": [{"file": "healthy.csv", "label": "healthy"}]}))
    return folder


def test_the_environment_variable_names_the_logs_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(_labelled(tmp_path / "logs")))
    assert main(["bench", "doctor", "--json"]) == 0
    assert [s["file"] for s in json.loads(capsys.readouterr().out)] == ["healthy.csv"]


def test_data_wins_over_the_environment_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    assert main(["bench", "doctor", "--json", "--data", str(_labelled(tmp_path / "logs"))]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_the_workspace_folder_is_the_default_from_keels_checkout(tmp_path, monkeypatch, capsys):
    _labelled(tmp_path / "shared" / "data" / "realruns")
    (tmp_path / "main").mkdir()
    monkeypatch.chdir(tmp_path / "main")  # keel's checkout beside shared/, as BENCHMARKS.md runs it
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert main(["bench", "doctor", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


@pytest.mark.parametrize("env", [None, ""])
def test_without_logs_one_error_line_says_what_it_needs(tmp_path, monkeypatch, capsys, env):
    monkeypatch.chdir(tmp_path)
    if env is None:
        monkeypatch.delenv(DATA_ENV, raising=False)
    else:
        monkeypatch.setenv(DATA_ENV, env)
    assert main(["bench", "doctor"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("keel bench doctor: error: ") and "--data" in err and DATA_ENV in err
    assert "labels.json" in err
