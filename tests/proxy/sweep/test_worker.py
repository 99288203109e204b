import math

import pytest

from keel._core import keys
from keel.proxy.sweep.worker import END_WINDOW, _end_signals
from keel.store.writer import RunWriter


def _run_store(run_dir, rows):
    with RunWriter(run_dir) as writer:
        for step, values in enumerate(rows):
            writer.add_signals(step, values)


def test_an_moe_run_reports_the_routers_end_signals_as_medians_of_its_last_steps(tmp_path):
    # 30 steps; the last END_WINDOW have router z 100..109 (median 104.5), imbalance 2.0, dead experts 1 or 2.
    rows = [
        {
            keys.ATTN_MAX_LOGIT: 5.0,
            keys.LOGITS_LOG_Z: 1.0,
            keys.GRAD_NORM: 0.5,
            keys.MOE_ROUTER_Z: float(step + 80 if step >= 30 - END_WINDOW else 1e6),
            keys.MOE_LOAD_IMBALANCE: 2.0,
            keys.MOE_DEAD_EXPERTS: float(1 + step % 2),
        }
        for step in range(30)
    ]
    _run_store(tmp_path, rows)
    signals = _end_signals(tmp_path)
    assert signals["router_z"] == pytest.approx(104.5)
    assert signals["load_imbalance"] == 2.0 and signals["dead_experts"] == 1.5
    assert (signals["max_attn_logit"], signals["log_z"], signals["grad_norm"]) == (5.0, 1.0, 0.5)


def test_a_dense_run_has_no_router_signals(tmp_path):
    _run_store(tmp_path, [{keys.ATTN_MAX_LOGIT: 5.0, keys.LOGITS_LOG_Z: 1.0, keys.GRAD_NORM: 0.5}] * 3)
    signals = _end_signals(tmp_path)
    assert (
        math.isnan(signals["router_z"])
        and math.isnan(signals["load_imbalance"])
        and math.isnan(signals["dead_experts"])
    )
    assert signals["max_attn_logit"] == 5.0
