"""`keel bench`: an option that has no effect in the mode chosen is refused with one line naming it, as detect's
--steps without --probe-costs already was (reviewer V11: doctor --repeats without --sizes ran the real-run scoring,
overhead --ddp 2 --policy skip started torchrun without the policy, snapshot --sizes 50M,50M timed 50M twice)."""

from __future__ import annotations

import pytest

from keel.cli import main


def _refused(capsys, argv: list[str]) -> str:
    assert main(["bench", *argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--repeats", "3"], "--repeats has no effect without --sizes"),
        (["--no-baseline"], "--no-baseline has no effect without --sizes"),
        (["--no-baseline", "--repeats", "2"], "--no-baseline, --repeats have no effect without --sizes"),
    ],
)
def test_doctor_refuses_size_sweep_options_without_sizes(capsys, tmp_path, argv: list[str], named: str) -> None:
    line = _refused(capsys, ["doctor", "--data", str(tmp_path), *argv])  # tmp_path: no labels.json, nothing to run
    assert named in line and "allowed: one or the other" in line


def test_doctor_refuses_data_with_sizes(capsys, tmp_path) -> None:
    assert "--data has no effect with --sizes" in _refused(capsys, ["doctor", "--sizes", "10", "--data", str(tmp_path)])


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--policy", "skip"], "--policy has no effect with --ddp"),
        (["--opposing-signals", "5"], "--opposing-signals has no effect with --ddp"),
        (["--source-drift", "5"], "--source-drift has no effect with --ddp"),
        (["--rounds", "1"], "--rounds has no effect with --ddp"),
        (["--compile"], "--compile has no effect with --ddp"),  # it said "--compile and --autocast have no effect"
        (["--signals", "rl", "--watch"], "--watch, --signals have no effect with --ddp"),
    ],
)
def test_overhead_ddp_refuses_what_the_ddp_benchmark_does_not_time(capsys, argv: list[str], named: str) -> None:
    line = _refused(capsys, ["overhead", "--ddp", "2", *argv])  # refused before torchrun starts
    assert named in line and "allowed: one or the other" in line


def test_snapshot_refuses_a_size_given_twice(capsys) -> None:
    line = _refused(capsys, ["snapshot", "--sizes", "50M,50M"])
    assert "'50M,50M': 50M given twice; allowed: each of 50M, 200M at most once" in line
