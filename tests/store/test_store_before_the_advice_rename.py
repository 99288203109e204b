"""A run store written before keel called a finding's advice "advice" is read as today's.

Such a store's findings table has a ``remedy`` column (today: ``advice``), its findings keep the ranked list in
the evidence under ``remedies`` (today: ``advice``), and its rollback reasons say "remedies: …" (today:
"actions: …"). The store below is made with sqlite3 and that schema, as keel wrote it.
"""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest

from keel.cli import main
from keel.report import write_report
from keel.store import RunReader
from keel.store.exporters import export_run

OLD_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE signals (step INTEGER NOT NULL, key TEXT NOT NULL, value REAL);
CREATE INDEX signals_key_step ON signals (key, step);
CREATE TABLE findings (
    step INTEGER NOT NULL, kind TEXT NOT NULL, severity TEXT NOT NULL, signal TEXT NOT NULL,
    value REAL, baseline REAL, evidence TEXT NOT NULL, cause TEXT NOT NULL, remedy TEXT NOT NULL
);
CREATE TABLE decisions (
    step INTEGER NOT NULL, action TEXT NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL,
    onset INTEGER, restored_step INTEGER
);
CREATE TABLE snapshots (step INTEGER NOT NULL, path TEXT NOT NULL, checksum TEXT NOT NULL, created REAL NOT NULL);
PRAGMA user_version=1;
"""
RANKED = [
    {"rank": 1, "action": "add QK-norm", "how": "keel.stabilize", "source": "Dehghani et al. 2023"},
    {"rank": 2, "action": "lower the peak learning rate", "how": "", "source": "Wortsman et al. 2023"},
]
EVIDENCE = {"max_logit": 41.0, "remedies": RANKED, "slope": 0.3}
ADVICE = "1. add QK-norm (Dehghani et al. 2023). 2. lower the peak learning rate (Wortsman et al. 2023)."
REASON = (
    "rolled back to the snapshot of step 20; remedies: LR × 0.1 from now on, optimizer moments reset. "
    "Trigger: divergence"
)


@pytest.fixture
def old_store(tmp_path):
    run = tmp_path / "old_run"
    run.mkdir()
    conn = sqlite3.connect(run / "run.sqlite")
    conn.executescript(OLD_DDL)
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("status", '"finished"'), ("run_id", '"old"')])
    conn.executemany("INSERT INTO signals VALUES (?, 'loss', ?)", [(s, 3.0 - 0.01 * s) for s in range(40)])
    conn.execute(
        "INSERT INTO findings VALUES (30, 'attention_logit_growth', 'warning', 'attn/max_logit', 41.0, 12.0, ?, "
        "'Attention logits grow.', ?)",
        (json.dumps(EVIDENCE), ADVICE),
    )
    conn.execute("INSERT INTO decisions VALUES (32, 'rollback', ?, 'keel', 30, 20)", (REASON,))
    conn.commit()
    conn.close()
    return run


def test_the_reader_gives_the_remedy_column_as_advice_and_the_ranked_list_under_advice_in_its_place(old_store):
    with RunReader(old_store) as run:
        (finding,) = run.findings()
        assert run.problems == []
    assert finding.advice == ADVICE
    assert list(finding.evidence) == ["max_logit", "advice", "slope"] and finding.evidence["advice"] == RANKED


def test_a_remedy_column_of_the_wrong_type_is_left_out_and_named(old_store):
    with sqlite3.connect(old_store / "run.sqlite") as conn:
        conn.execute(
            "INSERT INTO findings VALUES (31, 'loss_spike', 'critical', 'loss', 9.0, 2.0, '{}', 'c', x'3c623e')"
        )
    with RunReader(old_store) as run:
        assert [f.step for f in run.findings()] == [30]
        assert run.problems == [
            "findings: 1 row(s) of the wrong type left out (first: remedy is b'<b>' (blob); allowed: text)"
        ]


def test_doctor_reads_the_old_store_with_its_actions_and_stored_findings(old_store, capsys):
    assert main(["doctor", str(old_store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["decisions"][0]["actions"] == ["LR × 0.1 from now on", "optimizer moments reset"]
    assert doc["summary"]["stored_findings"]["warning"] == 1


def test_the_report_shows_the_old_store_s_ranked_advice_with_sources(old_store, tmp_path):
    page = write_report([old_store], tmp_path / "report.html").read_text()
    assert "could not be read" not in page
    assert "<ol class='advice'><li>add QK-norm <span class='how'>keel.stabilize</span>" in page
    assert "(Wortsman et al. 2023)" in page


def test_the_csv_export_of_the_old_store_has_an_advice_column(old_store, tmp_path):
    export_run(old_store, "csv", tmp_path / "out")
    with (tmp_path / "out" / "findings.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["advice"] == ADVICE and json.loads(row["evidence"])["advice"] == RANKED
