"""`keel list`: every registered stabilizer, with its description and reference, as text and as JSON."""

from __future__ import annotations

import json

import pytest

from keel.cli import main
from keel.nn import list_stabilizers
from keel.nn.stabilize import DEFAULT_STABILIZERS
from keel.nn.stabilizers import stabilizers


def test_list_prints_every_registered_stabilizer_with_description_and_reference(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(stabilizers.names()) >= 4
    for name in stabilizers.names():
        stabilizer = stabilizers.get(name)
        row = next(i for i, line in enumerate(lines) if line[2:].split(" ")[0] == name)
        assert lines[row].startswith("*" if name in DEFAULT_STABILIZERS else " ")
        assert lines[row].rstrip().endswith(stabilizer.description)
        assert lines[row + 1].strip() == stabilizer.reference  # the reference, on the line below, uncut


def test_list_json_matches_the_registry(capsys) -> None:
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["stabilizers"]
    assert [(r["name"], r["description"], r["reference"]) for r in rows] == list_stabilizers()
    assert {r["name"] for r in rows if r["default"]} == set(DEFAULT_STABILIZERS)


def test_list_shows_a_newly_registered_stabilizer(capsys, monkeypatch) -> None:
    class Toy:
        name = "toy_stabilizer"
        description = "does nothing, for this test"
        reference = "nobody, arXiv 0000.00000"
        order = 99

    monkeypatch.setitem(stabilizers._factories, "toy_stabilizer", Toy)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "toy_stabilizer" in out and "does nothing, for this test" in out and "arXiv 0000.00000" in out


def test_list_is_in_the_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "list" in capsys.readouterr().out
