"""The run store's ``batches`` table: each step's example ids as ranges, read back by `RunReader.batches`; a
hostile row is left out and counted, never raised; a store written before the table existed reads as no ids."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from keel.store import RunReader, RunWriter


def write(run_dir: Path, batches: dict[int, list[int]], *, drop_from: int | None = None) -> None:
    with RunWriter(run_dir) as writer:
        writer.set_meta({"seed": 0})
        for step, ids in batches.items():
            writer.add_batch(step, ids)
        if drop_from is not None:
            writer.drop_from(drop_from)


def raw_rows(run_dir: Path) -> list[tuple]:
    conn = sqlite3.connect(run_dir / "run.sqlite")
    try:
        return conn.execute("SELECT step, ids FROM batches ORDER BY rowid").fetchall()
    finally:
        conn.close()


def test_batches_are_stored_as_ranges_and_read_back_as_ids(tmp_path: Path) -> None:
    shuffled = [37, 5, 6, 7, 2]
    write(tmp_path, {0: list(range(0, 16)), 1: list(range(16, 32)), 2: shuffled, 3: []})
    assert raw_rows(tmp_path) == [(0, "0-15"), (1, "16-31"), (2, "2,5-7,37"), (3, "")]
    with RunReader(tmp_path) as reader:
        assert reader.batches() == {0: list(range(16)), 1: list(range(16, 32)), 2: [2, 5, 6, 7, 37], 3: []}
        assert reader.problems == []


def test_a_sequential_batch_of_any_size_is_a_few_bytes(tmp_path: Path) -> None:
    write(tmp_path, {7: list(range(10**6, 10**6 + 65536))})
    assert raw_rows(tmp_path) == [(7, "1000000-1065535")]


def test_drop_from_removes_the_batches_of_the_steps_a_resumed_run_does_again(tmp_path: Path) -> None:
    write(tmp_path, {s: [s] for s in range(6)}, drop_from=4)
    with RunReader(tmp_path) as reader:
        assert sorted(reader.batches()) == [0, 1, 2, 3]


HOSTILE_ROWS = {
    "ids not ids": (5, "x"),
    "ids backwards": (5, "9-3"),
    "ids negative": (5, "-1"),
    "ids naming 100 billion": (5, "0-99999999999"),
    "ids a 5000-digit number": (5, "9" * 5000),
    "ids NULL": (5, None),
    "ids a blob": (5, b"0-3"),
    "ids a number": (5, 7),
    "ids a real": (5, 2.5),
    "step text": ("five", "0-3"),
    "step a real": (5.5, "0-3"),
    "step a blob": (b"\x05", "0-3"),
}


def crafted(run_dir: Path, row: tuple) -> None:
    """A keel store whose batches table has no column types: nothing converts what a crafted file holds."""
    write(run_dir, {0: [0, 1], 9: [4]})
    conn = sqlite3.connect(run_dir / "run.sqlite")
    conn.execute("DROP TABLE batches")
    conn.execute("CREATE TABLE batches (step, ids)")
    conn.executemany("INSERT INTO batches VALUES (?, ?)", [(0, "0-1"), row, (9, "4")])
    conn.commit()
    conn.close()


@pytest.mark.parametrize("row", HOSTILE_ROWS.values(), ids=HOSTILE_ROWS.keys())
def test_a_hostile_batches_row_is_left_out_and_counted_never_raised(tmp_path: Path, row: tuple) -> None:
    crafted(tmp_path, row)
    with RunReader(tmp_path) as reader:
        assert reader.batches() == {0: [0, 1], 9: [4]}
        assert len(reader.problems) == 1 and reader.problems[0].startswith("batches: 1 row(s)")


def test_ids_written_as_a_number_into_keels_own_text_column_read_as_that_id(tmp_path: Path) -> None:
    write(tmp_path, {0: [0]})
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    conn.execute("INSERT INTO batches VALUES (1, 7)")  # TEXT affinity stores '7'
    conn.commit()
    conn.close()
    with RunReader(tmp_path) as reader:
        assert reader.batches() == {0: [0], 1: [7]} and reader.problems == []


def test_a_store_written_before_the_batches_table_reads_as_no_ids(tmp_path: Path) -> None:
    write(tmp_path, {})
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    conn.execute("DROP TABLE batches")
    conn.commit()
    conn.close()
    with RunReader(tmp_path) as reader:
        assert reader.batches() == {} and reader.problems == []
        assert reader.meta()["seed"] == 0


def test_a_batches_table_without_its_ids_column_reads_as_no_ids(tmp_path: Path) -> None:
    write(tmp_path, {})
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    conn.execute("DROP TABLE batches")
    conn.execute("CREATE TABLE batches (step INTEGER)")
    conn.execute("INSERT INTO batches VALUES (3)")
    conn.commit()
    conn.close()
    with RunReader(tmp_path) as reader:
        assert reader.batches() == {}


def test_ids_past_the_readers_budget_are_left_out_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import keel.store.reader as reader_module

    monkeypatch.setattr(reader_module, "MAX_BATCH_IDS", 40)
    write(tmp_path, {0: list(range(16)), 1: list(range(16, 32)), 2: list(range(32, 48)), 3: []})
    with RunReader(tmp_path) as reader:
        assert reader.batches() == {0: list(range(16)), 1: list(range(16, 32)), 3: []}
        assert len(reader.problems) == 1 and "1 row" in reader.problems[0]
