import json

from keel.harness.bench.snapshot import SIZES, SnapshotBenchConfig, bench_snapshot


def test_bench_snapshot_reports_the_documented_fields(monkeypatch):
    monkeypatch.setitem(SIZES, "1M", (256, 4))
    result = bench_snapshot(SnapshotBenchConfig(sizes=("1M",), repeats=1))
    [row] = result["results"]
    assert row["params"] == 4 * (256 * 256 + 256)
    assert row["bytes"] == 3 * 4 * row["params"] + 8 * 4  # parameters + two AdamW moments + 8 step counters
    assert row["blocked_s"] > 0 and row["torch_save_s"] > 0
    assert row["ratio"] == row["torch_save_s"] / row["blocked_s"]
    json.dumps(result)
