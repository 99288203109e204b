"""A store's file names live in the store layer: store_path / sweep_store_path name the file, store_folder undoes
them, and the report spells no store file name of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keel
from keel.store import STORE_NAME, STORE_SUFFIX, SWEEP_STORE_NAME, store_folder, store_path, sweep_store_path
from tests._core.source_literals import string_literals

SRC = Path(keel.__file__).parent
# folder names a person might give a run or a sweep; none ends in the store suffix
FOLDER_PART = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-. ", min_size=1, max_size=12).filter(
    lambda s: s.strip(" .") == s and not s.endswith(STORE_SUFFIX) and s not in (".", "..")
)


@pytest.mark.parametrize(
    ("given_path", "folder"),
    [
        ("runs/a", "runs/a"),
        ("runs/a/run.sqlite", "runs/a"),
        ("sweeps/s/sweep.sqlite", "sweeps/s"),
        ("exported.sqlite", "."),  # any .sqlite file is a store; its folder is where it lies
        ("runs/a.sqlite.d", "runs/a.sqlite.d"),
        ("runs/run.sqlite.bak", "runs/run.sqlite.bak"),
    ],
)
def test_store_folder_is_the_folder_a_store_lies_in(given_path: str, folder: str) -> None:
    assert store_folder(given_path) == Path(folder)


def test_the_file_names_are_the_ones_the_stores_are_written_under() -> None:
    assert (STORE_NAME, SWEEP_STORE_NAME, STORE_SUFFIX) == ("run.sqlite", "sweep.sqlite", ".sqlite")
    assert store_path("r") == Path("r") / STORE_NAME and sweep_store_path("s") == Path("s") / SWEEP_STORE_NAME


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(FOLDER_PART, min_size=1, max_size=3))
def test_store_folder_undoes_store_path_and_sweep_store_path(parts: list[str]) -> None:
    folder = Path(*parts)
    assert store_folder(store_path(folder)) == folder
    assert store_folder(sweep_store_path(folder)) == folder
    assert store_folder(folder) == folder
    assert store_path(store_path(folder)) == store_path(folder)  # a store file names itself


def test_the_report_spells_no_store_file_name() -> None:
    spelled = [
        f"{path.relative_to(SRC)}:{line} {value!r}"
        for path in sorted((SRC / "report").rglob("*.py"))
        for line, value in string_literals(path.read_text(), str(path))
        if value.endswith(STORE_SUFFIX)
    ]
    assert spelled == [], "import STORE_NAME, SWEEP_STORE_NAME, STORE_SUFFIX or store_folder from keel.store"
