"""Reading a run store leaves its folder as it was: no ``-shm``/``-wal`` files, no stray database created.

A store the Guard closed holds everything in ``run.sqlite``; a store still being written (or left by a killed
writer) keeps committed rows in ``run.sqlite-wal``, and those rows must still be read.
"""

import shutil

import pytest

from keel.store import RunReader, RunWriter
from tests.conftest import observe_poisoned_run


def _read_everything(path) -> tuple[int, int, int]:
    with RunReader(path) as run:
        run.meta()
        loss = len(run.signal("loss")[0])
        return loss, len(run.findings()), len(run.decisions()) + len(run.snapshots())


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_reading_a_store_the_guard_closed_leaves_no_shm_or_wal_files(tmp_path):
    observe_poisoned_run(tmp_path / "run", steps=30, poisoned_at=20)
    before = _names(tmp_path / "run")
    loss, findings, _ = _read_everything(tmp_path / "run")
    assert loss == 30 and findings >= 1
    assert "run.sqlite" in before and not [n for n in before if n.endswith(("-shm", "-wal"))]
    assert _names(tmp_path / "run") == before


def test_a_store_still_being_written_is_read_and_left_to_its_writer(tmp_path):
    writer = RunWriter(tmp_path / "live", flush_interval=60)
    try:
        for step in range(5):
            writer.add_signals(step, {"loss": 2.0})
        writer.flush()  # committed to run.sqlite-wal, not yet checkpointed into run.sqlite
        assert _read_everything(tmp_path / "live")[0] == 5
        writer.add_signals(5, {"loss": 2.0})
        writer.flush()
        assert _read_everything(tmp_path / "live")[0] == 6  # a new reader sees the newer commit
    finally:
        writer.close()
    assert _names(tmp_path / "live") == ["run.sqlite"]  # the writer, last to close, removed its files


def test_a_killed_writers_committed_rows_in_the_wal_are_read(tmp_path):
    writer = RunWriter(tmp_path / "live", flush_interval=60)
    try:
        for step in range(7):
            writer.add_signals(step, {"loss": 2.0})
        writer.flush()
        # the folder as a kill -9 leaves it: the main file and a WAL holding the committed rows
        (tmp_path / "killed").mkdir()
        for name in ("run.sqlite", "run.sqlite-wal"):
            shutil.copy(tmp_path / "live" / name, tmp_path / "killed" / name)
    finally:
        writer.close()
    assert _read_everything(tmp_path / "killed")[0] == 7


@pytest.mark.parametrize("folder", ["a#b", "lr=0.1?seed=0", "100%", "sp ace", "q'uote", "é"])
def test_a_store_in_a_folder_with_uri_characters_is_read_and_nothing_else_is_created(tmp_path, folder):
    # "file:{path}?mode=ro" cut such a path at "#" or "?": SQLite opened (and created) another file, read-write
    run_dir = tmp_path / "runs" / folder
    with RunWriter(run_dir) as w:
        w.add_signals(0, {"loss": 2.0})
    assert _read_everything(run_dir)[0] == 1
    assert _names(tmp_path / "runs") == [folder] and _names(run_dir) == ["run.sqlite"]
    assert _names(tmp_path) == ["runs"]


def test_keel_report_and_keel_doctor_leave_the_run_folder_as_it_was(tmp_path):
    from keel.cli import main

    observe_poisoned_run(tmp_path / "run", steps=30, poisoned_at=20)
    before = _names(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "report.html")]) == 0
    assert main(["doctor", str(tmp_path / "run")]) == 0
    assert _names(tmp_path / "run") == before
