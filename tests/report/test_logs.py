"""Training logs in the report: `keel report LOG` draws any log `keel doctor` reads as a run, with the doctor's
findings and named causes, beside run stores."""

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
