"""Every option of every verb, walked from its real argparse spec, against hostile values.

`tests/test_cli_bad_input.py` holds a hand-written table; this file reads the parser itself, so an option added
later is attacked without anyone listing it. The work behind each verb is stubbed (the ``world`` fixture): a
value either reaches the stub (exit 1, "Reached") or is refused with one ``keel VERB: error:`` line and exit
status 2 — never a traceback, never an internal error, never a file written or removed.
"""

from __future__ import annotations

import argparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import VERBS, build_parser
from tests import test_cli_bad_input as bad_input
from tests.test_cli_bad_input import _tree, assert_one_error_line, run_cli

# The stubbed work and the folder of hostile paths (afile, emptydir, fifo, loop, dangling, run, corrupt).
no_work = bad_input.no_work
world = bad_input.world


def _walk(parser: argparse.ArgumentParser, prefix: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, [*prefix, name])
        elif not isinstance(action, argparse._HelpAction) and action.nargs != 0:
            yield prefix, action


def _options() -> list[tuple[list[str], str, object]]:
    """(verb words, option string, nargs) of every option taking a value, from each verb's own parser."""
    found = []
    for verb in VERBS:
        top = build_parser(verb)
        verbs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        found += [(p, a.option_strings[0], a.nargs) for p, a in _walk(verbs.choices[verb], [verb]) if a.option_strings]
    return found


OPTIONS = _options()
# What each verb needs besides the option under attack, so that the option is what gets judged.
CONTEXT = {"report": ["run"], "export": ["run"], "doctor": ["run"]}


def _argv(prefix: list[str], option: str, value: str) -> list[str]:
    return [*prefix, *CONTEXT.get(prefix[0], []), f"{option}={value}"]


def test_the_walk_finds_every_verb_s_options():
    verbs = {(tuple(p), o) for p, o, _ in OPTIONS}
    assert len(OPTIONS) >= 70
    assert {(("bench", "rl"), "--seed"), (("bench", "data"), "--setting"), (("sweep",), "--workers")} <= verbs


def test_a_lone_double_dash_is_no_value(world, capsys):
    """``--seed=--``: argparse drops the ``--`` and stores an empty list without calling the option's type; keel
    ran the work with ``seed=[]`` (an internal error, or a silent default) until the parser refused it. One
    fixture for every option: building a world per option would cost a second each."""
    root, _ = world
    before = _tree(root)
    wrong = {}
    for prefix, option, nargs in OPTIONS:
        if nargs in ("?", "*"):
            continue
        code, out, err = run_cli(_argv(prefix, option, "--"), capsys)
        lines = err.splitlines()
        if (code, len(lines), out) != (2, 1, "") or f"argument {option}" not in err:
            wrong[" ".join([*prefix, option])] = (code, err)
    assert wrong == {}
    assert _tree(root) == before


HOSTILE = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "-1",
            "0",
            str(2**63),
            "9" * 5000,
            "nan",
            "-inf",
            "1e400",
            "٣",
            "\x00",
            "a\nb",
            "\x1b[2J",
            "\udcff",
            "afile",
            "emptydir",
            "fifo",
            "loop",
            "dangling",
            "nope/x",
            "run",
            "--",
            "-",
        ]
    ),
    st.text(max_size=12),
)


@pytest.mark.slow
@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=st.tuples(st.sampled_from(OPTIONS), HOSTILE))
def test_any_value_of_any_option_is_refused_in_one_line_or_reaches_the_work(case, world, capsys):
    (prefix, option, _), value = case
    root, _ = world
    before = _tree(root)
    code, out, err = run_cli(_argv(prefix, option, value), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "internal error" not in err or "Reached" in err, err
    assert len(lines) <= 1, err
    assert code in (0, 2) or (code == 1 and "Reached" in err), (code, err)
    if code != 0:
        assert _tree(root) == before


def test_a_control_character_in_a_bench_doctor_path_stays_on_one_line(world, capsys):
    """`keel bench doctor` printed its own error with the raw path: a line break in it made two lines."""
    code, out, err = run_cli(["bench", "doctor", "--data", "no\nsuch"], capsys)
    assert_one_error_line(code, out, err)
    assert "no\\nsuch" in err or "no such" in err
