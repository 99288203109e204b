"""`keel doctor FOLDER` on a folder of run stores: each run one or two levels down is found and examined."""

import json

import pytest

from keel.cli import main
from keel.doctor import find_logs
from tests.conftest import observe_poisoned_run
from tests.doctor.guard_runs import recovered_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/A/keel (a spike, observed), runs/B/keel (skips and a rollback), runs/solo (one level down), each
    with files beside the store that are not runs (an exported TensorBoard event file, snapshots)."""
    root = tmp_path_factory.mktemp("runs")
    observe_poisoned_run(root / "A" / "keel", steps=70)
    recovered_run(root / "B" / "keel")
    observe_poisoned_run(root / "solo", steps=70)
    export = root / "A" / "keel" / "export" / "tensorboard"
    export.mkdir(parents=True)
    (export / "events.out.tfevents.1.host").write_bytes(b"")  # beside the store, never chosen over it
    (root / ".hidden" / "keel").mkdir(parents=True)
    (root / "notes").mkdir()
    return root


def test_the_runs_one_or_two_levels_down_are_found(runs):
    assert [p.relative_to(runs).as_posix() for p in find_logs(runs)] == ["A/keel", "B/keel", "solo"]
    assert find_logs(runs / "A" / "keel") == [runs / "A" / "keel"]  # a run is itself


def test_doctor_on_a_folder_of_runs_diagnoses_each_and_says_which(runs, capsys):
    assert main(["doctor", str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"keel doctor: {runs}: 3 runs in it: A/keel, B/keel, solo"
    headers = [line for line in out.splitlines() if line.startswith("keel doctor: ")][1:]
    names = ("A/keel", "B/keel", "solo")
    assert [h.split(" (")[0] for h in headers] == [f"keel doctor: {runs / name}" for name in names]
    assert "decisions recorded by the Guard: 3 skip, 1 rollback" in out


def test_json_of_a_folder_of_runs_has_one_document_per_run(runs, capsys):
    assert main(["doctor", str(runs), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == str(runs)
    assert [(r["source"], r["format"]) for r in doc["runs"]] == [
        (str(runs / name), "keel_store") for name in ("A/keel", "B/keel", "solo")
    ]
    assert {f["step"] for f in doc["runs"][0]["findings"] if f["severity"] == "critical"} == {60}  # A's spike


def test_fail_on_answers_for_every_run(runs, capsys):
    assert main(["doctor", str(runs), "--fail-on", "critical"]) == 1


def test_a_folder_holding_one_run_uses_it_and_says_so(runs, capsys):
    assert main(["doctor", str(runs / "A")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"keel doctor: {runs / 'A' / 'keel'} (keel_store, 70 steps")
    assert f"note: {runs / 'A'} holds one keel run store, {runs / 'A' / 'keel'}: examined that" in out


def test_an_unreadable_run_among_several_is_one_error_line_and_the_others_are_examined(runs, tmp_path, capsys):
    for name in ("good", "bad"):
        (tmp_path / name).mkdir()
    observe_poisoned_run(tmp_path / "good", steps=30, poisoned_at=20)
    (tmp_path / "bad" / "run.sqlite").write_text("not a database")
    assert main(["doctor", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"keel doctor: error: {tmp_path / 'bad'}")
    assert f"keel doctor: {tmp_path / 'good'} (keel_store" in captured.out


def test_a_folder_with_no_log_at_all_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    assert main(["doctor", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a folder with no training log in it" in err


def _board(folder, losses, wall0=0.0):
    from tests.doctor.wire import record, scalar_event

    folder.mkdir(parents=True)
    events = b"".join(record(scalar_event(s, "train/loss", v, wall0 + s)) for s, v in enumerate(losses))
    (folder / "events.out.tfevents.1700000000.host").write_bytes(events)


def test_a_folder_of_tensorboard_runs_is_examined_and_reported_run_by_run(tmp_path, capsys):
    # two runs read as one got their tags prefixed (run_a/train/loss: no loss) and their steps merged into a
    # "restart", and neither NaN was found (reviewer W3); a Keras run's train/ and validation/ stay one run
    from keel.doctor.formats import find_logs, tensorboard_runs
    from keel.report import write_report

    healthy = [2.0 + 0.01 * (s % 3) for s in range(40)]
    _board(tmp_path / "lightning_logs" / "version_0", healthy[:30] + [float("nan")] + healthy[31:], 0.0)
    _board(tmp_path / "lightning_logs" / "version_1", healthy[:20] + [float("nan")] + healthy[21:], 1000.0)
    _board(tmp_path / "keras" / "train", healthy, 0.0)
    _board(tmp_path / "keras" / "validation", healthy, 0.0)
    logs = tmp_path / "lightning_logs"
    assert [p.name for p in find_logs(logs)] == ["version_0", "version_1"]
    assert tensorboard_runs(tmp_path / "keras") == [tmp_path / "keras"]
    assert main(["doctor", str(logs)]) == 0
    out = capsys.readouterr().out
    assert "2 runs in it: version_0, version_1" in out and out.count("critical  non_finite") == 2
    from tests.report.test_page import _payload

    page = write_report([logs], tmp_path / "report.html").read_text()
    assert [run["name"] for run in _payload(page)["runs"]] == ["version_0", "version_1"]


def test_a_log_beside_the_runs_of_a_folder_is_named_as_left_out_on_stderr(tmp_path, capsys):
    # runs/A/keel, runs/B/keel and runs/train.csv: keel doctor listed the two runs and said nothing of the log (W4)
    from tests.report.test_logs import _runs_with_a_log_beside_them

    root = _runs_with_a_log_beside_them(tmp_path / "runs")
    assert main(["doctor", str(root)]) == 0
    captured = capsys.readouterr()
    assert "2 runs in it" in captured.out and "train.csv" not in captured.out
    assert captured.err.count("\n") == 1 and "train.csv" in captured.err and "config.yaml" not in captured.err
    assert f"keel doctor {root / 'train.csv'}" in captured.err


def test_a_folder_of_loose_logs_is_an_error_naming_them(tmp_path, capsys):
    # a folder holding train.csv and nothing keel reads as a folder: the error listed what it looked for only
    (tmp_path / "train.csv").write_text("step,loss\n0,2.0\n1,1.9\n")
    (tmp_path / "stdout.log").write_text("hello\n")
    (tmp_path / "config.yaml").write_text("lr: 0.1\n")
    assert main(["doctor", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it holds stdout.log, train.csv: give one of them itself" in err
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "it holds stdout.log, train.csv" in capsys.readouterr().err
    (tmp_path / "train.csv").unlink()
    (tmp_path / "stdout.log").unlink()
    assert main(["doctor", str(tmp_path)]) == 2
    assert "it holds" not in capsys.readouterr().err  # nothing named like a log: the message as before
