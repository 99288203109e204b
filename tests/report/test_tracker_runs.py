"""keel report takes the folders W&B and MLflow write, as keel doctor does: each run its own (helper D's patch)."""

from __future__ import annotations

import shutil
from pathlib import Path

from keel.report import write_report
from tests.doctor.test_trackers import _mlflow_db
from tests.report.test_page import _payload

DATA = Path(__file__).resolve().parents[1] / "doctor" / "data"


def test_a_wandb_folder_of_runs_is_one_run_each_on_the_page(tmp_path):
    runs = _payload(write_report([DATA / "wandb_runs" / "wandb"], tmp_path / "report.html").read_text())["runs"]
    assert len(runs) == 3  # four folders, one of them the resumed run's second part
    assert all("offline-run-" in r["name"] for r in runs)


def test_an_mlflow_store_and_database_of_several_runs_are_one_run_each(tmp_path):
    shutil.copytree(DATA / "mlruns", tmp_path / "mlruns")
    store_runs = _payload(write_report([tmp_path / "mlruns"], tmp_path / "a.html").read_text())["runs"]
    assert len(store_runs) == 2
    db = _mlflow_db(tmp_path)
    db_runs = _payload(write_report([db], tmp_path / "b.html").read_text())["runs"]
    assert len(db_runs) >= 1 and all(r["name"] for r in db_runs)
