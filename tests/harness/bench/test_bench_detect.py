"""`keel bench detect`: the JSON schema on a short run, and (slow) the whole zoo passing."""

from __future__ import annotations

import argparse
import json

import pytest

from keel.harness.bench import detect as bench
from keel.harness.bench._component_costs import ROWS


def test_json_schema_on_a_short_healthy_and_unstable_run(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--only", "data_outliers", "--only", "poisoned_batch", "--json", "--no-reference"])
    original = bench.score_scenario
    bench.score_scenario = lambda name, **kw: original(name, **{**kw, "steps": 10})  # keep the test fast
    try:
        code = bench.main(args)
    finally:
        bench.score_scenario = original
    out = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in out["scenarios"]}
    assert set(rows) == {"data_outliers", "poisoned_batch"}
    for row in rows.values():
        expected = {"name", "healthy", "expected_kind", "detected", "kind", "step", "lead_steps", "false_alarms"}
        assert expected <= set(row)
    healthy, poisoned = rows["data_outliers"], rows["poisoned_batch"]
    assert healthy["healthy"] is True and healthy["expected_kind"] is None and healthy["false_alarms"] == 0
    # 10 steps end before the poisoned batch (step 150): nothing to detect, and the bench says so
    assert poisoned["healthy"] is False and poisoned["expected_kind"] == "loss_spike" and poisoned["detected"] is False
    assert code == 1  # a scenario failed: the exit code says it


def test_unknown_scenario_names_the_allowed():
    with pytest.raises(ValueError, match="allowed: .*poisoned_batch"):
        bench.bench_detect(["nope"])


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the whole `keel bench detect`: 456 s on a quiet 2-core machine, 1361 s under load
def test_the_whole_zoo_passes():
    result = bench.bench_detect()
    failed = [row for row in result["scenarios"] if not row["passed"]]
    assert failed == [], failed
    s = result["summary"]
    assert s["detected"] == s["instabilities"] >= 8 and s["false_alarms"] == 0 and s["healthy"] >= 6


@pytest.mark.slow
def test_probe_costs_report_every_probe_and_both_sharpness_settings():
    costs = bench.probe_costs(steps=1, repeats=1, threads=1)
    # every row of the table (the component rows: tests/harness/bench/test_bench_component_costs.py)
    assert set(costs["ratio_to_bare"]) | set(costs["skipped"]) == set(ROWS)
    assert costs["ratio_to_bare"]["moe bare"] == 1.0  # the router probe's baseline is the proxy with MoE blocks
    assert costs["extra_ms_vs_foundation"]["qat foundation"] == 0.0  # the QAT probes' baseline is the QAT proxy
    assert costs["ratio_to_bare"]["bare"] == 1.0 and all(v > 0 for v in costs["cpu_ms_per_step"].values())
    assert set(costs["amortized_fraction_of_bare"]) == set(costs["default_every"])
    assert set(costs["sharpness"]) == set(bench.SHARPNESS_SETTINGS)
    assert all(s["s_per_measurement"] > 0 for s in costs["sharpness"].values())
