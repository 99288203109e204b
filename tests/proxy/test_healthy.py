"""A healthy proxy run must not raise a single warning: false alarms cost real runs."""

import pytest

from keel.proxy.trainer import TrainConfig, train_proxy


@pytest.mark.slow  # 2,000 steps: `make test-all`; keel bench detect scores healthy runs in CI's place
def test_2000_healthy_proxy_steps_raise_no_warning_and_skip_nothing():
    config = TrainConfig(size="tiny", steps=2000, batch_size=8, seq_len=32, lr=3e-3, warmup=50, eval_batches=1)
    run = train_proxy(config, policy="skip", probes="default")  # Guard's default set (the transformer
    # probes' healthy runs are the scenario zoo's: tests/harness/scenarios)
    assert len(run.losses) == 2000 and run.aborted is None
    assert [f for f in run.findings if f.severity != "info"] == []
    assert run.decisions == []
    assert run.losses[-1] < run.losses[0] - 2.0  # it really trained
