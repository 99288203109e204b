"""`keel bench doctor` (src/keel/harness/bench/doctor.py) on a tiny labelled folder built here."""

import argparse
import json

import numpy as np
import pytest

from keel.cli import main
from keel.harness.bench import doctor as bench


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    healthy = [2.0 * (1 + 0.02 * rng.standard_normal()) for _ in range(100)]
    event = [2.0 * (1 + 0.02 * rng.standard_normal()) for _ in range(40)] + [6.0, 6.2, 6.1]
    for name, losses in (("healthy.csv", healthy), ("spike.csv", event)):
        (tmp_path / name).write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in enumerate(losses)))
    labels = {
        "series": [
            {"file": "healthy.csv", "label": "healthy", "spike_steps": []},
            {"file": "spike.csv", "label": "spike", "spike_steps": [40, 41, 42]},
            {"file": "missing.csv", "label": "spike", "spike_steps": [1]},
        ]
    }
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    return tmp_path


def test_scores_as_json(tmp_path, capsys):
    args = argparse.Namespace(data=_folder(tmp_path), json=True)
    assert bench.main(args) == 0
    scores = {s["file"]: s for s in json.loads(capsys.readouterr().out)}
    assert set(scores) == {"healthy.csv", "spike.csv"}  # a listed file that is absent is left out
    assert (scores["healthy.csv"]["warnings"], scores["healthy.csv"]["criticals"]) == (0, 0)
    spike = scores["spike.csv"]
    assert spike["context"] == 40 and spike["detected"] is True
    assert spike["detected_by"] == "40 loss_spike critical" and spike["early_alarms"] == 0
    assert spike["prefixed"] == {}  # no llm.c log in this folder: no prefix run


def test_markdown_and_missing_labels(tmp_path, capsys):
    assert bench.main(argparse.Namespace(data=_folder(tmp_path), json=False)) == 0
    out = capsys.readouterr().out
    assert "| `healthy.csv` | healthy | 100 | 1 | 0 | 0 | 0 |" in out
    assert "| `spike.csv` | spike | 43 | 40 | 40 loss_spike critical | 0 | none |" in out
    # a missing labels.json is keel.cli's one error line and exit status 2 (bench.main raises, the CLI prints)
    assert main(["bench", "doctor", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no labels.json" in err and err.count("\n") == 1


def test_size_sweep_measures_both_readers_in_child_processes(capsys):
    assert bench.main(argparse.Namespace(data=None, json=True, sizes=[300, 1200], no_baseline=False, repeats=1)) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rows"] for r in rows] == [300, 1200]
    for r in rows:
        new, old = r["columnar"], r["records"]
        assert new["findings"] == old["findings"]  # the same log, the same findings
        assert 0 < new["read_s"] <= new["total_s"] and 0 < new["without_detectors_s"]
        assert new["peak_rss_mb"] >= new["rss_after_imports_mb"] > 0
    table = bench.format_sweep(rows)
    assert table.count("\n") == 3 and "| 1,200 |" in table


def test_the_sweep_log_holds_a_resume_a_nan_and_gaps(tmp_path):
    from keel.doctor import examine_log

    path = tmp_path / "log.csv"
    bench.write_sweep_log(path, 100_000)
    result = examine_log(path)
    s = result.summary
    assert s["records"] == 100_000 and s["restarts"]["count"] == 1 and s["text_columns"] == ["phase"]
    assert s["signals"]["loss"]["non_finite"] == 1 and s["signals"]["grad/norm"]["observations"] == 90_000


def test_sweep_arguments_are_checked(capsys):
    from keel.cli import main

    for bad in (["--sizes", "0"], ["--sizes", "x"], ["--sizes", "10", "--repeats", "-1"]):
        try:
            code = main(["bench", "doctor", *bad])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, bad
        assert "allowed: an int from 1 to" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("rows", ["0", "-5", "1e3", str(10**30), "100000001"])
def test_a_size_past_what_fits_or_below_one_is_one_error_before_any_work(rows, capsys):
    """--sizes took any int (10**30 reached the CSV generator; session 10's hostile walk)."""
    assert main(["bench", "doctor", "--sizes", rows]) == 2
    err = capsys.readouterr().err
    assert "--sizes" in err and "allowed: an int from 1 to 100000000" in err and err.count("\n") == 1
