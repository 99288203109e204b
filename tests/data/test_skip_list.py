"""The skip list file (`keel.data.skip_list`): entries round trip, a hostile file gets one ValueError naming it and
is left as it was, and `SkipList.add` never leaves a partial file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import files as files_module
from keel._core.example_ids import MAX_IDS
from keel.data import skip_list as skip_list_module
from keel.data.skip_list import MAX_FILE_BYTES, SKIP_LIST_NAME, SkipEntry, SkipList


def entry(kind: str = "examples", first: int = 3, last: int = 3, ids: tuple[int, ...] = (4, 7), reason: str = "x"):
    return SkipEntry(kind=kind, first_step=first, last_step=last, ids=ids, reason=reason)  # type: ignore[arg-type]


ENTRIES = st.tuples(
    st.sampled_from(["window", "examples"]),
    st.integers(0, 10**6),
    st.integers(0, 50),
    st.lists(st.integers(0, 5000), max_size=40),
    st.text(max_size=30),
).map(lambda t: SkipEntry(kind=t[0], first_step=t[1], last_step=t[1] + t[2], ids=tuple(t[3]), reason=t[4]))


@given(st.lists(ENTRIES, max_size=4))
@settings(max_examples=50, deadline=None)
def test_entries_round_trip_through_the_file(
    tmp_path_factory: pytest.TempPathFactory, entries: list[SkipEntry]
) -> None:
    run_dir = tmp_path_factory.mktemp("run")
    skips = SkipList(run_dir)
    for e in entries:
        skips.add(e)
    again = SkipList(run_dir)
    assert again.entries == skips.entries
    distinct = list(dict.fromkeys(entries))  # an entry added again is not written twice
    assert [e.ids for e in again.entries] == [tuple(sorted(set(e.ids))) for e in distinct]
    assert again.ids() == frozenset(i for e in entries for i in e.ids)
    assert again.ids(["window"]) == frozenset(i for e in entries if e.kind == "window" for i in e.ids)


def test_an_entry_keeps_its_ids_ascending_and_distinct_so_it_equals_its_read_back_self(tmp_path: Path) -> None:
    skips = SkipList(tmp_path)
    skips.add(entry(ids=(9, 3, 3)))
    assert skips.entries[0].ids == (3, 9)
    assert SkipList(tmp_path).entries == skips.entries


@pytest.mark.parametrize("ids", [(-1,), (1.5,), (True,), ("3",)])
def test_an_entry_with_ids_that_are_not_example_ids_is_refused_before_it_can_poison_the_file(ids: tuple) -> None:
    with pytest.raises(ValueError, match="ids"):
        entry(ids=ids)


def test_a_run_directory_whose_name_has_a_dot_holds_the_file_even_before_it_exists(tmp_path: Path) -> None:
    run_dir = tmp_path / "lr3e-4.bs32"
    skips = SkipList(run_dir)
    assert skips.path == run_dir / SKIP_LIST_NAME
    skips.add(entry())
    assert run_dir.is_dir() and (run_dir / SKIP_LIST_NAME).is_file()


def test_a_json_path_is_the_file_itself(tmp_path: Path) -> None:
    assert SkipList(tmp_path / "mine.json").path == tmp_path / "mine.json"


def test_a_missing_file_is_an_empty_list(tmp_path: Path) -> None:
    assert SkipList(tmp_path).entries == [] and SkipList(tmp_path).ids() == frozenset()


def _good(**changes: object) -> dict:
    raw = {"kind": "examples", "first_step": 1, "last_step": 2, "ids": "0-3", "reason": "r"}
    return {**raw, **changes}


HOSTILE_FILES: dict[str, bytes] = {
    "not JSON": b"{not json",
    "empty": b"",
    "JSON list": b"[1, 2]",
    "JSON number": b"1",
    "no version": json.dumps({"entries": []}).encode(),
    "wrong version": json.dumps({"keel_skip_list": 2, "entries": []}).encode(),
    "version true": json.dumps({"keel_skip_list": True, "entries": []}).encode(),
    "version 1.0": json.dumps({"keel_skip_list": 1.0, "entries": []}).encode(),
    "entries not a list": json.dumps({"keel_skip_list": 1, "entries": {"a": 1}}).encode(),
    "entries missing": json.dumps({"keel_skip_list": 1}).encode(),
    "entry not an object": json.dumps({"keel_skip_list": 1, "entries": ["0-3"]}).encode(),
    "entry missing ids": json.dumps({"keel_skip_list": 1, "entries": [{"kind": "window", "first_step": 1}]}).encode(),
    "unknown kind": json.dumps({"keel_skip_list": 1, "entries": [_good(kind="batch")]}).encode(),
    "kind a list": json.dumps({"keel_skip_list": 1, "entries": [_good(kind=["window"])]}).encode(),
    "last before first": json.dumps({"keel_skip_list": 1, "entries": [_good(first_step=5, last_step=4)]}).encode(),
    "step a float": json.dumps({"keel_skip_list": 1, "entries": [_good(first_step=1.0)]}).encode(),
    "step negative": json.dumps({"keel_skip_list": 1, "entries": [_good(first_step=-1)]}).encode(),
    "step text": json.dumps({"keel_skip_list": 1, "entries": [_good(last_step="2")]}).encode(),
    "bad ids text": json.dumps({"keel_skip_list": 1, "entries": [_good(ids="3-1")]}).encode(),
    "ids a number": json.dumps({"keel_skip_list": 1, "entries": [_good(ids=7)]}).encode(),
    "ids a list": json.dumps({"keel_skip_list": 1, "entries": [_good(ids=[1, 2])]}).encode(),
    "reason a number": json.dumps({"keel_skip_list": 1, "entries": [_good(reason=3)]}).encode(),
    "non-UTF-8 bytes": b'{"keel_skip_list": 1, "entries": [], "x": "\xff\xfe"}',
    "nested 100k deep": b"[" * 100_000,
    "a 5000-digit step": b'{"keel_skip_list": 1, "entries": [{"kind": "window", "first_step": ' + b"9" * 5000 + b"}]}",
    "NaN step": b'{"keel_skip_list": 1, "entries": [{"kind": "window", "first_step": NaN, "last_step": 1, "ids": ""}]}',
}


@pytest.mark.parametrize("content", HOSTILE_FILES.values(), ids=HOSTILE_FILES.keys())
def test_a_hostile_file_gets_one_value_error_naming_it_and_is_left_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / SKIP_LIST_NAME
    path.write_bytes(content)
    with pytest.raises(ValueError) as caught:
        SkipList(tmp_path)
    assert str(path) in str(caught.value)
    assert "allowed" in str(caught.value) or "not JSON" in str(caught.value)
    assert path.read_bytes() == content
    assert os.listdir(tmp_path) == [SKIP_LIST_NAME]


def test_a_file_over_the_size_limit_is_refused_without_being_read(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / SKIP_LIST_NAME
    with path.open("wb") as handle:  # sparse: 100 MB on paper, nothing on disk
        handle.truncate(100 * 2**20)
    assert path.stat().st_size > MAX_FILE_BYTES

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was read")

    monkeypatch.setattr(Path, "read_text", no_reading)
    monkeypatch.setattr(Path, "read_bytes", no_reading)
    with pytest.raises(ValueError, match=f"{path}.*bytes.*allowed"):
        SkipList(tmp_path)


def test_add_leaves_no_partial_file_and_no_entry_when_writing_fails(tmp_path: Path, monkeypatch) -> None:
    skips = SkipList(tmp_path)
    skips.add(entry(ids=(1,)))
    before = skips.path.read_bytes()

    def disk_full(fd: int) -> None:  # the new list is written to its partial file, and then the disk is full
        raise OSError("disk full")

    monkeypatch.setattr(files_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        skips.add(entry(ids=(2,)))
    monkeypatch.undo()
    assert skips.path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [SKIP_LIST_NAME]  # the temporary file is gone too
    assert [e.ids for e in skips.entries] == [(1,)], "the entry that was not written must not count as added"
    skips.add(entry(ids=(3,)))
    assert SkipList(tmp_path).ids() == {1, 3}


def test_add_keeps_entries_another_writer_added_since_the_list_was_read(tmp_path: Path) -> None:
    ours, theirs = SkipList(tmp_path), SkipList(tmp_path)
    theirs.add(entry(ids=(5,), reason="by hand"))
    ours.add(entry(ids=(6,)))
    assert SkipList(tmp_path).ids() == {5, 6}


def test_add_refuses_to_overwrite_a_file_that_became_hostile(tmp_path: Path) -> None:
    skips = SkipList(tmp_path)
    skips.path.write_text("{broken")
    with pytest.raises(ValueError, match=str(skips.path)):
        skips.add(entry())
    assert skips.path.read_text() == "{broken"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kind": "batch"}, "kind"),
        ({"first": -1}, "first_step"),
        ({"first": True}, "first_step"),
        ({"first": 4, "last": 3}, "last_step"),
        ({"reason": 3}, "reason"),
    ],
)
def test_skip_entry_refuses_bad_fields_naming_them(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"SkipEntry.{field}.*allowed"):
        entry(**changes)  # type: ignore[arg-type]


def test_a_file_whose_entries_name_too_many_ids_in_all_is_refused_before_any_is_made(tmp_path: Path) -> None:
    # each entry is within the per-text cap; together they are twice it (a 222-byte file that cost 24 s and 1.8 GB
    # to read, and 100 such entries would not fit in memory: reviewer V10)
    half = MAX_IDS
    entries = [_good(ids=f"{k * half}-{(k + 1) * half - 1}") for k in range(2)]
    path = tmp_path / SKIP_LIST_NAME
    path.write_text(json.dumps({"keel_skip_list": 1, "entries": entries}))
    with pytest.raises(ValueError, match=f"{path}: entries 0-1 name {2 * half} ids in all; allowed: at most {half}"):
        SkipList(tmp_path)


def test_the_total_counts_each_entrys_distinct_ids(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(skip_list_module, "MAX_TOTAL_IDS", 6)
    path = tmp_path / SKIP_LIST_NAME
    path.write_text(json.dumps({"keel_skip_list": 1, "entries": [_good(ids="0-2,1-3"), _good(ids="10-11")]}))
    assert SkipList(tmp_path).ids() == {0, 1, 2, 3, 10, 11}  # 4 + 2: at the cap, not past it


def test_add_refuses_an_entry_that_would_take_the_file_past_the_total_and_leaves_it(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(skip_list_module, "MAX_TOTAL_IDS", 5)
    skips = SkipList(tmp_path)
    skips.add(entry(ids=(1, 2, 3)))
    before = skips.path.read_bytes()
    with pytest.raises(ValueError, match=f"{skips.path}: entries 0-1 would name 6 ids in all; allowed: at most 5"):
        skips.add(entry(ids=(7, 8, 9)))
    assert skips.path.read_bytes() == before and [e.ids for e in skips.entries] == [(1, 2, 3)]
