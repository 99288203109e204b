"""A run killed after a rollback wrote its skip-list entry, but before a disk snapshot taken after the rollback
was in place, does the same rollback again when resumed (`/tmp/h28R` kill loop: one window entry twice in 2 of
42 cycles): the skip list holds each entry once."""

from __future__ import annotations

from keel.data.skip_list import SkipEntry, SkipList

WINDOW = SkipEntry(kind="window", first_step=68, last_step=83, ids=tuple(range(4352, 5376)), reason="rollback at 83")


def test_an_entry_the_file_holds_already_is_not_added_again(tmp_path):
    SkipList(tmp_path).add(WINDOW)
    resumed = SkipList(tmp_path)  # the resumed process, which redid the rollback
    resumed.add(WINDOW)
    assert SkipList(tmp_path).entries == resumed.entries == [WINDOW]


def test_entries_that_differ_in_anything_are_all_kept(tmp_path):
    skips = SkipList(tmp_path)
    later = SkipEntry(kind="window", first_step=68, last_step=90, ids=WINDOW.ids, reason="rollback at 90")
    for entry in (WINDOW, later, SkipEntry(kind="examples", first_step=83, last_step=83, ids=(4400,))):
        skips.add(entry)
    assert len(SkipList(tmp_path).entries) == 3
