"""Training logs in the report: `keel report LOG` draws any log `keel doctor` reads as a run, with the doctor's
findings and named causes, beside run stores."""

from dataclasses import replace

import pytest

from keel.cli import main
from keel.doctor import examine_log
from keel.doctor.to_store import log_to_store
from keel.report import ReportError, write_report
from keel.store import RunReader
from tests.report.stores import make_run_store
from tests.report.test_page import _payload


def _csv(path, steps, *, nan_at=None, restart_at=None):
    rows = [(s, 2.0 + 0.01 * (s % 3)) for s in range(steps)]
    if restart_at is not None:  # the run crashed and was restarted from an earlier checkpoint
        rows += [(s, 1.5) for s in range(restart_at, steps + 5)]
    text = "step,loss,grad_norm\n" + "".join(  # the NaN in the first stretch only
        f"{s},{'nan' if s == nan_at and i < steps else loss},{1.0 + 0.01 * (s % 4)}\n"
        for i, (s, loss) in enumerate(rows)
    )
    path.write_text(text)
    return path


def test_a_log_is_written_as_a_store_with_its_signals_findings_and_causes(tmp_path):
    log = _csv(tmp_path / "train.csv", 60, nan_at=50)
    result = log_to_store(log, tmp_path / "run")
    reader = RunReader(tmp_path / "run")
    meta = reader.meta()
    assert meta["format"] == "csv" and meta["source"] == str(log) and meta["steps"] == 60
    assert [d["kind"] for d in meta["diagnosis"]] == ["non_finite"]
    assert [(f.step, f.kind) for f in reader.findings()] == [(f.step, f.kind) for f in result.findings]
    steps, losses = reader.signal("loss")
    assert list(steps) == list(range(60)) and losses[3] == 2.0 and losses[50] != losses[50]  # NaN kept
    assert [f.kind for f in examine_log(log).findings] == [f.kind for f in result.findings]


def test_a_restarted_log_stores_the_later_stretch_as_a_resumed_run_would(tmp_path):
    # the stretch the restart replaced had a NaN at 35: its mark was drawn on the later, clean curve (reviewer W7)
    log = _csv(tmp_path / "train.csv", 40, nan_at=35, restart_at=30)
    result = log_to_store(log, tmp_path / "run")
    reader = RunReader(tmp_path / "run")
    steps, losses = reader.signal("loss")
    assert list(steps) == list(range(45)) and set(losses[30:].tolist()) == {1.5}
    assert [f.step for f in result.findings if f.kind == "non_finite"] == [35]  # keel doctor still lists it
    assert [f for f in reader.findings() if f.kind == "non_finite"] == []
    meta = reader.meta()
    assert meta["steps"] == 45 and any("a restart replaced" in note for note in meta["notes"])


def test_the_report_draws_a_log_beside_a_run_store(tmp_path):
    store = make_run_store(tmp_path / "guarded", steps=60, spike_at=None, skip_at=None)
    log = _csv(tmp_path / "train.csv", 60, nan_at=50)
    page = write_report([store, log], tmp_path / "report.html").read_text()
    runs = _payload(page)["runs"]
    assert [r["name"] for r in runs] == ["guarded", "train.csv"]
    assert "a log examined by keel doctor" in page and "Non-finite" in page


def test_a_path_that_is_neither_a_store_nor_a_log_is_one_error_saying_both(tmp_path, capsys):
    prose = tmp_path / "notes.txt"
    prose.write_text("this run went fine\n")
    with pytest.raises(ReportError, match="not a training log keel doctor reads .*unknown log format"):
        write_report([prose], tmp_path / "report.html")
    assert main(["report", str(prose), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "allowed:" in err and "training logs keel doctor reads" in err
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "r.html").exists()


def _runs_with_a_log_beside_them(root, *, runs=("A/keel", "B/keel")):
    for run in runs:
        make_run_store(root / run, steps=30, spike_at=None, skip_at=None)
    _csv(root / "train.csv", 60, nan_at=50)
    (root / "config.yaml").write_text("lr: 0.1\n")  # not a log: not named
    (root / ".train.log.swp").write_text("x")  # hidden: not named
    return root


@pytest.mark.parametrize("runs", [("A/keel", "B/keel"), ("A/keel",)])
def test_a_log_beside_the_runs_of_a_folder_is_named_as_left_out(tmp_path, capsys, runs):
    # runs/A/keel, runs/B/keel and runs/train.csv: the report showed the two runs and said nothing of the log (W4)
    root = _runs_with_a_log_beside_them(tmp_path / "runs", runs=runs)
    out = tmp_path / "r.html"
    assert main(["report", str(root), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.csv" in err and "config.yaml" not in err and ".swp" not in err
    assert f"keel report {root / 'train.csv'}" in err  # how to draw it
    page = out.read_text()
    assert len(_payload(page)["runs"]) == len(runs)
    notes = page[page.index("<div class='notes'>") :]
    assert "train.csv" in notes[: notes.index("</div>")]


def test_hostile_names_beside_the_runs_are_one_line_on_stderr_and_escaped_on_the_page(tmp_path, capsys):
    root = _runs_with_a_log_beside_them(tmp_path / "runs")
    (root / "a\nb\x1b[31m.log").write_text("x")  # a newline and a terminal code in the name
    (root / "<img src=x onerror=alert(1)>.csv").write_text("x")
    (root / "gone.log").symlink_to(root / "missing")  # a dangling link: not a file
    (root / "folder.csv").mkdir()  # a folder: not a file
    for i in range(8):
        (root / f"more{i}.txt").write_text("x")
    out = tmp_path / "r.html"
    assert main(["report", str(root), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "gone.log" not in err and "folder.csv" not in err
    assert "and 6 more" in err  # 11 files: five named
    page = out.read_text()
    assert "<img src=x" not in page and "a\\nb\\x1b[31m.log" in page


def _same_run(a, b):
    """Two RunData hold the same page content: meta, findings, decisions, and every series (NaN-aware)."""
    import numpy as np

    assert a.meta == b.meta and a.findings == b.findings and a.decisions == b.decisions and a.lengths == b.lengths
    assert list(a.series) == list(b.series)  # in the store's order: the page lists them so
    for key, (steps, values) in a.series.items():
        other_steps, other_values = b.series[key]
        assert steps.dtype == other_steps.dtype and values.dtype == other_values.dtype, key
        assert np.array_equal(steps, other_steps) and np.array_equal(values, other_values, equal_nan=True), key


def _twice_restarted(path):
    steps = [*range(20), *range(10, 30), *range(5, 40)]
    path.write_text("step,loss,lr\n" + "".join(f"{s},{2 + s / 100},{'inf' if s == 7 else 0.1}\n" for s in steps))
    return path


_LOGS = {
    "plain": lambda p: _csv(p / "train.csv", 80, nan_at=50),
    "restarted": lambda p: _csv(p / "train.csv", 60, nan_at=45, restart_at=30),
    "restarted twice": lambda p: _twice_restarted(p / "train.csv"),
    "one row": lambda p: (p / "train.csv").write_text("step,loss\n7,2.5\n"),
    "NaN-only column, text column, empty cells": lambda p: (p / "train.csv").write_text(
        "step,loss,gn,note\n" + "".join(f"{s},{'' if s % 3 else 2.0},nan,run a\n" for s in range(30))
    ),
    "negative and huge steps": lambda p: (p / "train.csv").write_text(
        "step,loss\n-5,1.0\n-1,2.0\n0,-inf\n2305843009213693951,1e308\n-3,4.0\n"
    ),
    "a signal only in a stretch a restart replaced": lambda p: (p / "train.csv").write_text(
        "step,loss,aux\n" + "".join(f"{s},2.0,{1.0 if s >= 5 else ''}\n" for s in range(10)) + "5,1.0,\n6,1.0,\n"
    ),
    "same step again": lambda p: (p / "train.jsonl").write_text(
        '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 2.0}\n{"step": 1, "loss": 3.0}\n{"step": 2, "loss": NaN}\n'
    ),
}


@pytest.mark.parametrize("shape", list(_LOGS))
def test_the_report_draws_a_log_from_memory_as_it_would_from_its_full_store(tmp_path, shape):
    # keel report of a 100k-step x 50-column log took 26 s writing every value to the scratch store and 7 s
    # reading it back; the page's series now come from the timeline, the rest from the store as before
    from keel.doctor import build_timeline, read_log
    from keel.doctor.examine import examine_timeline
    from keel.doctor.to_store import stored_series, write_store
    from keel.report import load_run
    from keel.store import RunWriter

    _LOGS[shape](tmp_path)
    log = next(p for p in tmp_path.iterdir() if p.is_file())
    log_to_store(log, tmp_path / "full")
    result, timeline = examine_timeline(read_log(log))
    write_store(result, timeline, tmp_path / "lean", signals=False)
    assert RunReader(tmp_path / "lean").signal_keys() == []
    from_memory = load_run(tmp_path / "lean", series=stored_series(timeline))
    _same_run(load_run(tmp_path / "full"), from_memory)
    # the series are what a resumed run's store holds: each restart drops the rows of its step on (RunWriter)
    with RunWriter(tmp_path / "resumed") as writer:
        last = None
        for obs in build_timeline(read_log(log)).iter_observations():
            if last is not None and obs.step <= last:
                writer.drop_from(obs.step)
            writer.add_signals(obs.step, obs.values)
            last = obs.step
    resumed = load_run(tmp_path / "resumed")
    _same_run(replace(resumed, meta={}), replace(from_memory, meta={}, findings=[], decisions=[]))
