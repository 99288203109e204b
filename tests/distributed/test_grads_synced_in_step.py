"""A model without DDP whose optimizer averages the gradients inside step() (nanochat's distributed optimizer): the
gradients keel measures are each rank's own, so the replica check (DDP's averaged gradients must agree) does not
apply. keel warned 'the replicas are drifting apart' on every step (helper F's F7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

pytestmark = pytest.mark.slow


def test_an_optimizer_that_averages_inside_step_raises_no_replica_alarm_and_the_nan_is_skipped(tmp_path):
    out = tmp_path / "result.json"
    torchrun(Path(__file__).with_name("grads_synced_in_step_worker.py"), str(out), nproc=2)
    result = json.loads(out.read_text())
    assert result["rank_outliers"] == [[3, "non_finite"]]  # rank 1's NaN named; no replica mismatch on any step
    assert result["decisions"] == [[3, "skip"]]
    assert result["ranks_agree"] and result["finite"]
