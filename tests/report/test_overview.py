"""The report opens with what a person wants first — the runs compared, the named cause, the loss chart with its
marks — and shows a diagnosis card that several runs share once, naming them. Stores written by the real Guard."""

import re

import pytest

from keel.report import write_report
from tests.conftest import observe_poisoned_run
from tests.doctor.guard_runs import recovered_run
from tests.report.test_page import _payload


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A/keel and B/keel: the same observed run (same seed, same spike at step 60); C/keel: skips and a rollback."""
    root = tmp_path_factory.mktemp("overview")
    observe_poisoned_run(root / "A" / "keel")
    observe_poisoned_run(root / "B" / "keel")
    recovered_run(root / "C" / "keel")
    return root


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory):
    return write_report([runs], tmp_path_factory.mktemp("page") / "report.html").read_text()


def _overview(page: str) -> str:
    return re.search(r"<section id='overview'>(.*?)</section>", page, re.S).group(1)


def test_the_page_opens_with_the_runs_the_named_cause_and_the_loss_chart(page):
    top = _overview(page)
    assert page.index("<section id='overview'>") < page.index("<h2>Diagnosis</h2>") < page.index("<h2>Timelines</h2>")
    assert "<table class='runs'>" in top and "<div class='card named'>" in top
    assert [top.index(part) for part in ("<table class='runs'>", "card named", "id='chart-0'")] == sorted(
        top.index(part) for part in ("<table class='runs'>", "card named", "id='chart-0'")
    )
    charts = _payload(page)["charts"]
    assert charts[0]["id"] == "chart-0" and charts[0]["keys"][0] == "loss"
    marks = {m["type"] for m in _payload(page)["marks"]["chart-0"]}
    assert {"critical", "skip", "rollback"} <= marks  # the loss chart carries the findings, skips and rollback
    assert page.count("id='chart-0'") == 1  # drawn at the top only, not again with the other timelines
    for name in ("A/keel", "B/keel", "C/keel"):
        assert f"</span>{name}" in top


def test_a_named_cause_several_runs_share_is_listed_once_with_their_names(page):
    causes = re.search(r"<div class='card named'>(.*?)</div>", _overview(page), re.S).group(1)
    items = re.findall(r"<li>(.*?)</li>", causes, re.S)
    spike = [item for item in items if "loss spike" in item.lower() or "outlier" in item.lower()]
    assert len(spike) == 1 and "A/keel" in spike[0] and "B/keel" in spike[0]
    assert any("C/keel" in item and "on-finite" in item for item in items)


def test_identical_diagnosis_cards_are_shown_once_saying_which_runs_share_them(page):
    diagnosis = page[page.index("<h2>Diagnosis</h2>") : page.index("<h2>Timelines</h2>")]
    groups = re.findall(r"<section class='group'><h3>(.*?)</h3>(.*?)</section>", diagnosis, re.S)
    heads = [re.sub(r"<[^>]+>", "", head) for head, _ in groups]
    assert heads == ["shared by A/keel, B/keel", "C/keel"]
    shared_cards = groups[0][1]
    assert shared_cards.count("<div class='card critical'>") >= 1 and "loss spike" in shared_cards
    assert diagnosis.count("loss spike</b> on <code>loss</code> — first at step 60") == 1  # once, not per run
    assert "non finite" in groups[1][1]


def test_a_run_that_did_not_close_names_its_worst_findings_instead(runs, tmp_path):
    import shutil
    import sqlite3

    shutil.copytree(runs / "C" / "keel", tmp_path / "killed")
    conn = sqlite3.connect(tmp_path / "killed" / "run.sqlite")
    conn.execute("DELETE FROM meta WHERE key = 'diagnosis'")  # the Guard writes it at close() …
    conn.execute("""UPDATE meta SET value = '"running"' WHERE key = 'status'""")  # … with the final status
    conn.commit()
    conn.close()
    top = _overview(write_report([tmp_path / "killed"], tmp_path / "r.html").read_text())
    assert "no named cause recorded (the run did not close)" in top
    assert "<li><b>critical non finite</b> — first at step 23" in top
