"""`keel bench snapshot --lora`: keel's LoRA snapshot against a full copy, measured in the same run."""

import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from keel.harness.bench import snapshot as bench  # noqa: E402


@pytest.mark.slow  # ~1.5 s (a model build); tests/recover/test_fixed_params.py checks the bytes by default
def test_the_lora_case_reports_keels_bytes_beside_the_full_copy(monkeypatch):
    tiny = {**bench.LORA_LLAMA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    monkeypatch.setattr(bench, "LORA_LLAMA", {**tiny, "num_attention_heads": 4, "num_key_value_heads": 4})
    monkeypatch.setattr(bench, "LORA_RANK", 2)
    result = bench.bench_snapshot(bench.SnapshotBenchConfig(sizes=(), repeats=1, lora=True))
    lora = result["lora"]
    adapters = 2 * 2 * (2 * 32 + 2 * 32)  # 2 layers x q/v x (A: 2x32, B: 32x2)
    assert lora["trainable"] == adapters
    assert lora["bytes"] == 3 * 4 * adapters + 8 * 4  # adapters + AdamW's two moments + 8 step counters
    assert lora["full_bytes"] == lora["bytes"] + lora["fixed_bytes"]
    assert lora["bytes_ratio"] == lora["full_bytes"] / lora["bytes"]
    json.dumps(result)
