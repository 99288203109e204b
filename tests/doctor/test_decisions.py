"""`keel doctor` on a run store shows what the Guard did: skips, rollbacks and the actions they applied."""

import json
import shutil
import sqlite3

import pytest

from keel.cli import main
from keel.doctor import examine_log
from keel.store import RunReader
from tests.doctor.guard_runs import recovered_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return recovered_run(tmp_path_factory.mktemp("decisions") / "run")


def test_the_stored_decisions_are_what_the_guard_did(run):
    with RunReader(run) as store:
        assert [(d.step, d.action, d.restored_step) for d in store.decisions()] == [
            (23, "skip", None),
            (24, "skip", None),
            (25, "skip", None),
            (26, "rollback", 20),
        ]


def test_the_text_lists_skips_rollbacks_and_their_actions(run, capsys):
    assert main(["doctor", str(run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("decisions recorded by the Guard: 3 skip, 1 rollback")
    block = lines[start : start + 4]
    assert block[1] == "  skip at steps 23, 24, 25"
    rollback = " ".join(" ".join(lines[start + 2 : start + 6]).split())  # wrapped to the terminal's width
    assert rollback.startswith(
        "rollback at step 26 to the snapshot of step 20 (trouble began at step 23); actions: LR × 0.1 from now on"
    )
    assert "trigger: 4 consecutive steps needed a skip (cap 3)" in " ".join(out.split())  # what set it off


def test_the_json_holds_every_decision_with_its_actions(run, capsys):
    assert main(["doctor", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["decisions"] == {"skip": 3, "rollback": 1}
    assert [
        (d["step"], d["action"], d["by"], d["onset"], d["restored_step"], d["actions"]) for d in doc["decisions"]
    ] == [
        (23, "skip", "keel", None, None, []),
        (24, "skip", "keel", None, None, []),
        (25, "skip", "keel", None, None, []),
        (26, "rollback", "keel", 23, 20, ["LR × 0.1 from now on"]),
    ]
    assert doc["decisions"][3]["reason"].startswith("rolled back to the snapshot of step 20")


def test_a_store_written_before_the_rename_says_remedies_in_its_reasons_and_is_read_the_same(run, tmp_path, capsys):
    # keel's rollback reasons said "remedies: …" before the post-rollback actions were called actions.
    old = shutil.copytree(run, tmp_path / "old")
    with sqlite3.connect(old / "run.sqlite") as conn:
        conn.execute("UPDATE decisions SET reason = replace(reason, '; actions: ', '; remedies: ')")
    (reason,) = [d.reason for d in examine_log(old).decisions if d.action == "rollback"]
    assert "; remedies: LR × 0.1 from now on. Trigger: " in reason
    assert main(["doctor", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decisions"][3]["actions"] == ["LR × 0.1 from now on"]
    assert main(["doctor", str(old)]) == 0
    assert "(trouble began at step 23); actions: LR × 0.1 from now on" in " ".join(capsys.readouterr().out.split())


def test_a_log_without_decisions_says_nothing_about_them(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("step,loss\n" + "".join(f"{s},2.0\n" for s in range(30)))
    assert examine_log(log).decisions == []
    main(["doctor", str(log), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["decisions"] == [] and "decisions" not in doc["summary"]
    main(["doctor", str(log)])
    assert "decisions recorded" not in capsys.readouterr().out
