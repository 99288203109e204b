"""`keel list`: the domain index covers every registered component both ways, as text and as JSON."""

from __future__ import annotations

import argparse
import json

import pytest

from keel import catalog
from keel.cli import main
from keel.nn.stabilize import DEFAULT_STABILIZERS
from keel.nn.stabilizers import stabilizers
from keel.signals.registry import DEFAULT_PROBES


def test_every_registered_component_is_indexed_and_every_entry_exists() -> None:
    assert catalog.registered() - catalog.indexed() == set(), "index these in keel/catalog.py _INDEX"
    stale = []
    for kind, name in catalog.indexed():  # registered, or the public attribute of its package (e.g. ALLoRA)
        try:
            catalog._component(kind, name)
        except (ValueError, AttributeError, ImportError):
            stale.append((kind, name))
    assert stale == [], "these are indexed but exist no more"


def test_every_entry_has_a_domain_a_summary_and_the_right_defaults() -> None:
    entries = catalog.catalog()
    assert {e.domain for e in entries} <= set(catalog.DOMAINS[:-1])  # nothing left in "other"
    assert all(e.summary for e in entries), [e.name for e in entries if not e.summary]
    assert {e.name for e in entries if e.kind == "signal" and e.default} == set(DEFAULT_PROBES)
    assert {e.name for e in entries if e.kind == "stabilizer" and e.default} == set(DEFAULT_STABILIZERS)
    for name in stabilizers.names():  # a stabilizer's own description and reference, uncut
        entry = next(e for e in entries if (e.kind, e.name) == ("stabilizer", name))
        assert (entry.summary, entry.reference) == (stabilizers.get(name).description, stabilizers.get(name).reference)


def test_list_prints_every_component_under_its_domain_heading(capsys) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for entry in catalog.catalog():
        row = next(i for i, line in enumerate(lines) if line[2:].split()[:2] == [entry.kind, entry.name])
        heading = max(i for i, line in enumerate(lines[:row]) if line and not line.startswith(" ") and line[0] != "*")
        assert lines[heading] == entry.domain
        assert lines[row].startswith("*" if entry.default else " ") and lines[row].rstrip().endswith(entry.summary)


def test_list_json_groups_the_same_entries_by_domain(capsys) -> None:
    assert main(["list", "--json"]) == 0
    grouped = json.loads(capsys.readouterr().out)
    flat = [(domain, row["kind"], row["name"]) for domain, rows in grouped.items() for row in rows]
    assert flat == [(e.domain, e.kind, e.name) for e in catalog.catalog()]


def test_list_filters_by_domain_and_kind(capsys) -> None:
    assert main(["list", "--json", "--domain", "preference and RL", "--kind", "detector"]) == 0
    grouped = json.loads(capsys.readouterr().out)
    assert list(grouped) == ["preference and RL"]
    assert {row["kind"] for row in grouped["preference and RL"]} == {"detector"}
    assert "likelihood_displacement" in {row["name"] for row in grouped["preference and RL"]}


def test_a_registered_but_unindexed_component_is_shown_not_hidden(capsys, monkeypatch) -> None:
    class Toy:
        """Does nothing, for this test."""

        name = "toy_stabilizer"
        description = "does nothing, for this test"
        reference = "nobody, arXiv 0000.00000"
        order = 99

    monkeypatch.setitem(stabilizers._factories, "toy_stabilizer", Toy)
    out = catalog.format_catalog(catalog.catalog())
    assert "\nother\n" in out and "stabilizer toy_stabilizer" in out and "arXiv 0000.00000" in out


@pytest.mark.parametrize("argv", [["list", "--domain", "nope"], ["list", "--kind", "widget"]])
def test_list_refuses_an_unknown_domain_or_kind_in_one_line(argv, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice" in err


def test_list_is_in_the_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "list" in capsys.readouterr().out
    assert isinstance(catalog.add_arguments(argparse.ArgumentParser()), type(None))
