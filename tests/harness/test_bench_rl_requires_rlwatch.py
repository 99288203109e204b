"""keel bench rl without rlwatch installed: one clear error before any training, not a traceback after minutes."""

from __future__ import annotations

import importlib.util

import pytest

from keel.harness.bench import rl


def test_without_rlwatch_bench_rl_refuses_before_training(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rlwatch" else real(name, *a))
    trained = []
    monkeypatch.setattr(rl, "score_scenario", lambda *a, **k: trained.append(a))
    with pytest.raises(ValueError, match=r"rlwatch installed \(pip install 'keel\[rl-bench\]'\)"):
        rl.bench_rl()
    assert trained == []
