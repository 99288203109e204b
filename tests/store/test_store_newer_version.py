"""A run store written by a newer keel (a higher ``PRAGMA user_version``): read with one warning, never written.

An older keel writing into it could drop what the newer one relies on, and stamping it back to this keel's
version would hide that from the newer keel (reviewer V15: ``Guard(resume=True)`` set a version-2 store to 1).
"""

import sqlite3
import warnings

import pytest
import torch

import keel
from keel._core.errors import KeelWarning
from keel.store import RunReader, RunWriter, StoreError
from keel.store.schema import SCHEMA_VERSION

NEWER = SCHEMA_VERSION + 1


def _newer_store(run_dir) -> None:
    """A finished store, then what a newer keel might add: a higher version, a column and a table."""
    with RunWriter(run_dir) as writer:
        writer.set_meta({"status": "finished"})
        for step in range(3):
            writer.add_signals(step, {"loss": 1.0})
    conn = sqlite3.connect(run_dir / "run.sqlite")
    conn.execute(f"PRAGMA user_version={NEWER}")
    conn.execute("ALTER TABLE signals ADD COLUMN rank INTEGER")
    conn.execute("CREATE TABLE spans (a, b)")
    conn.commit()
    conn.close()


def _version(run_dir) -> int:
    conn = sqlite3.connect(run_dir / "run.sqlite")
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_a_newer_store_is_refused_for_writing_and_left_at_its_version(tmp_path):
    _newer_store(tmp_path / "run")
    with pytest.raises(StoreError, match=f"written by a newer keel.*version {NEWER}.*allowed: upgrade keel"):
        RunWriter(tmp_path / "run")
    assert _version(tmp_path / "run") == NEWER


def test_a_newer_store_is_read_with_one_warning(tmp_path):
    _newer_store(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with RunReader(tmp_path / "run") as run:
            steps, _ = run.signal("loss")
            assert run.meta()["status"] == "finished"
    assert len(steps) == 3
    said = [str(w.message) for w in caught if issubclass(w.category, KeelWarning)]
    assert len(said) == 1 and "written by a newer keel" in said[0] and str(tmp_path / "run") in said[0]


def test_a_store_of_this_version_is_read_without_a_warning(tmp_path):
    with RunWriter(tmp_path / "run") as writer:
        writer.add_signals(0, {"loss": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunReader(tmp_path / "run").close()
    assert _version(tmp_path / "run") == SCHEMA_VERSION


def test_resuming_a_newer_store_is_refused_and_does_not_restamp_it(tmp_path):
    _newer_store(tmp_path / "run")
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the refusal releases the folder: a second try says the same, not "in use"
        with pytest.raises(StoreError, match="written by a newer keel"):
            keel.Guard(model, optimizer, run_dir=str(tmp_path / "run"), policy="recover", resume=True)
    assert _version(tmp_path / "run") == NEWER


def test_the_cli_says_the_newer_store_warning_as_one_line(tmp_path):
    # Reviewer W (session 15): `keel doctor` / `report` / `export` on such a store printed Python's two-line warning
    # ("/…/keel/doctor/store_log.py:64: KeelWarning: …" and the source line `with RunReader(file) as run:`).
    import subprocess
    import sys

    _newer_store(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "keel.cli", "doctor", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == [
        f"keel doctor: warning: {tmp_path / 'run' / 'run.sqlite'}: written by a newer keel (store version {NEWER}; "
        f"this keel writes version {SCHEMA_VERSION}): read as far as this keel knows its tables"
    ]
