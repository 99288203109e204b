"""`keel bench optim`: the library call and the CLI module on a tiny model (the figures are not asserted)."""

from __future__ import annotations

import argparse
import json

import pytest

from keel.harness.bench import optim as bench


def test_bench_optim_reports_every_optimizer_against_adamw() -> None:
    config = bench.OptimBenchConfig(d_model=32, n_layers=1, steps=1, repeats=2, warmup=1, grad_sets=2)
    result = bench.bench_optim(config)
    names = [row["optimizer"] for row in result["results"]]
    assert names[0] == "adamw" and sorted(names) == sorted(bench.OPTIMIZERS)
    assert result["results"][0]["ratio_vs_adamw"] == 1.0
    for row in result["results"]:
        assert row["ratio_vs_adamw"] > 0 and row["step_ms"] > 0 and row["gb_per_s"] > 0
    assert result["params"] > 0 and result["device"] == "cpu"


def test_main_prints_json_with_results(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--d-model",
            "32",
            "--layers",
            "1",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--optimizers",
            "spam",
            "stable_spam",
            "--json",
        ]
    )
    assert bench.main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [(r["optimizer"], type(r["ratio_vs_adamw"])) for r in payload["results"]] == [
        ("adamw", float),
        ("spam", float),
        ("stable_spam", float),
    ]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="OptimBenchConfig.optimizers"):
        bench.OptimBenchConfig(optimizers=("adam9",))
    with pytest.raises(ValueError, match="OptimBenchConfig.repeats="):
        bench.OptimBenchConfig(repeats=0)
