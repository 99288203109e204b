"""`keel bench trl`: guard_trainer's step-time cost on real TRL trainers, per policy, against the bare trainer.

No timing thresholds: the slow test runs the quick setting for real and checks the figures' shape and that every
configuration trained under its Guard; the default tests check the aggregation (ratios to the bare block of the
same repeat, the rotation, the control) with the blocks stubbed, and the refusals.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from keel.cli import main
from keel.harness.bench import trl as bench
from keel.harness.bench.trl import CONTROL, TrlBenchConfig

VARIANTS = {"policy=observe", "policy=skip", "policy=recover"}


@pytest.mark.slow  # two real trainers x 5 variants x 3 blocks, ~40 s on the loaded 2-core VM (make test-all)
@pytest.mark.usefixtures("one_torch_thread")
def test_quick_run_times_every_policy_on_real_dpo_and_grpo_trainers_beside_the_bare_one(capsys):
    pytest.importorskip("trl")
    assert main(["bench", "trl", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    quick = TrlBenchConfig.quick()
    assert set(result["trainers"]) == {"dpo", "grpo"}
    for figures in result["trainers"].values():
        assert set(figures["ratio"]) == set(figures["ratio_steady"]) == set(figures["ratio_cpu"]) == VARIANTS
        assert set(figures["guard"]) == VARIANTS
        assert set(figures["step_ms"]) == VARIANTS | {"bare", CONTROL}
        assert all(len(r) == quick.repeats for r in figures["ratio_repeats"].values())
        assert all(r > 0 for r in [*figures["ratio"].values(), figures["control"]])
        for name, blocks in figures["guard"].items():  # each policy's Guard stepped every update, healthily
            assert [b["steps"] for b in blocks] == [quick.warmup + quick.steps + 1] * quick.repeats, name
            assert all(b["actions"] == {} for b in blocks), name
        assert all(b["snapshots"] >= 1 for b in figures["guard"]["policy=recover"])  # recover did snapshot
        assert all(b["snapshots"] == 0 for b in figures["guard"]["policy=skip"])


def _stub_blocks(monkeypatch, ms: dict[str | None, float]) -> list[tuple[str, str | None]]:
    """Replace the real trainers by blocks of constant steps: ``ms[policy]`` per step. Returns the call order."""
    calls: list[tuple[str, str | None]] = []

    def block(kind, policy, config, workdir):
        calls.append((kind, policy))
        out = {"times": [ms[policy] / 1e3] * config.steps, "cpu_times": [ms[policy] / 2e3] * config.steps}
        return out | ({} if policy is None else {"guard": {"steps": 1, "actions": {}, "snapshots": 0}})

    monkeypatch.setattr(bench, "time_block", block)
    return calls


def test_each_ratio_is_the_variant_block_over_the_bare_block_of_the_same_repeat(monkeypatch):
    calls = _stub_blocks(monkeypatch, {None: 10.0, "observe": 11.0, "skip": 12.0, "recover": 15.0})
    result = bench.bench_trl(TrlBenchConfig(trainers=("dpo",), steps=3, repeats=3))
    figures = result["trainers"]["dpo"]
    assert figures["ratio"] == pytest.approx({"policy=observe": 1.1, "policy=skip": 1.2, "policy=recover": 1.5})
    assert figures["ratio_steady"] == pytest.approx(figures["ratio"])
    assert figures["ratio_cpu"] == pytest.approx(figures["ratio"])
    assert figures["cpu_ms"]["bare"] == pytest.approx(5.0)
    assert figures["control"] == pytest.approx(1.0) and figures["step_ms"]["bare"] == pytest.approx(10.0)
    # one untimed warm-up block, then every variant once per repeat, each repeat starting one variant later
    assert calls[0] == ("dpo", None)
    firsts = [calls[1 + 5 * r][1] for r in range(3)]
    assert firsts == [None, "observe", "skip"] and len(calls) == 1 + 5 * 3


def test_the_figures_are_json(monkeypatch):
    _stub_blocks(monkeypatch, {None: 10.0, "observe": 10.0, "skip": 10.0, "recover": 10.0})
    json.dumps(bench.bench_trl(TrlBenchConfig.quick()))


def test_without_trl_the_bench_refuses_in_one_line_before_training(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    calls = _stub_blocks(monkeypatch, {})
    assert main(["bench", "trl", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'keel[trl]'" in err[0], err
    assert calls == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("trainers", ("ppo",)), ("trainers", ()), ("warmup", 0), ("steps", 0), ("hidden_size", 30), ("batch_size", 3)],
)
def test_a_bad_setting_is_one_error_naming_it(field, value):
    with pytest.raises(ValueError, match=f"TrlBenchConfig.{field}"):
        TrlBenchConfig(**{field: value})


def test_an_unknown_trainer_on_the_command_line_is_refused_by_the_parser():
    parser = argparse.ArgumentParser(exit_on_error=False)
    bench.add_arguments(parser)
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parser.parse_args(["--trainer", "ppo"])


@pytest.mark.usefixtures("one_torch_thread")  # main sets torch's threads (--threads 1): restored afterwards
def test_the_text_table_has_a_row_per_policy_and_the_control(monkeypatch, capsys):
    _stub_blocks(monkeypatch, {None: 10.0, "observe": 11.0, "skip": 12.0, "recover": 15.0})
    assert main(["bench", "trl", "--quick", "--trainer", "grpo", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("bare trainer", "policy=observe", "policy=skip", "policy=recover", "control: bare again"):
        assert row in out, row
    assert "1.5000" in out and "dpo" not in out
