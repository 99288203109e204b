"""Run labels: each run by the shortest end of its path no other run shares; one clear error for a wrong path."""

from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.report import ReportError, run_labels, write_report
from tests.report.stores import make_run_store
from tests.report.test_page import _payload


@pytest.mark.parametrize(
    "paths,labels",
    [
        (["/w/runs/keel"], ["keel"]),
        (["/w/A/keel", "/w/B/keel"], ["A/keel", "B/keel"]),
        (["/w/A/keel", "/w/B/keel", "/w/B/other"], ["A/keel", "B/keel", "other"]),
        (["/x/A/keel", "/y/A/keel"], ["x/A/keel", "y/A/keel"]),
        (["keel", "A/keel"], ["keel", "A/keel"]),  # every end of "keel" is A/keel's too: shown whole
        (["/a/keel", "a/keel"], ["/a/keel", "a/keel"]),
    ],
)
def test_labels_are_the_shortest_unique_path_ends(paths, labels):
    assert run_labels([PurePosixPath(p) for p in paths]) == labels


_part = st.sampled_from(["keel", "A", "B", "runs", "..", "x y", "é"])
_path = st.builds(
    lambda root, parts: PurePosixPath(root, *parts), st.sampled_from(["", "/"]), st.lists(_part, min_size=1, max_size=4)
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_path, min_size=1, max_size=8, unique=True))
def test_distinct_paths_get_distinct_labels_each_an_end_of_its_path(paths):
    labels = run_labels(paths)
    assert len(set(labels)) == len(paths)
    for path, label in zip(paths, labels, strict=True):
        tail = PurePosixPath(label).parts
        assert path.parts[-len(tail) :] == tail


@pytest.fixture(scope="module")
def two_keels(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    for name in ("A", "B"):
        make_run_store(root / name / "keel", steps=40, spike_at=None, skip_at=None, per_param=False)
    return root


def test_runs_in_folders_of_the_same_name_are_labelled_by_their_parents(two_keels, tmp_path, monkeypatch):
    monkeypatch.chdir(two_keels)
    page = write_report(["A/keel", "B/keel"], tmp_path / "r.html").read_text()
    assert [r["name"] for r in _payload(page)["runs"]] == ["A/keel", "B/keel"]
    one = write_report(["A/keel"], tmp_path / "one.html").read_text()
    assert [r["name"] for r in _payload(one)["runs"]] == ["keel"]
    here = write_report(["A/keel/run.sqlite", "."], tmp_path / "dot.html").read_text()  # "." names its folder
    assert [r["name"] for r in _payload(here)["runs"]] == ["A/keel", "B/keel"]  # A/keel given twice: shown once


def test_a_folder_of_runs_two_levels_down_is_expanded(two_keels, tmp_path):
    page = write_report([two_keels], tmp_path / "r.html").read_text()
    assert [r["name"] for r in _payload(page)["runs"]] == ["A/keel", "B/keel"]


@pytest.mark.parametrize("wrong", ["typo", "empty", "notes.txt"])
def test_a_path_that_holds_no_store_is_one_error_line_exit_2(two_keels, tmp_path, capsys, wrong):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a store\n")
    with pytest.raises(ReportError, match=f"{wrong}: "):
        write_report([two_keels / "A" / "keel", tmp_path / wrong], tmp_path / "r.html")
    assert main(["report", str(two_keels / "A" / "keel"), str(tmp_path / wrong), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"keel report: error: {tmp_path / wrong}") and err.count("\n") == 1
    assert not (tmp_path / "r.html").exists()
