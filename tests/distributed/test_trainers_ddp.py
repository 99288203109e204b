"""The HF Trainer and Lightning adapters under torchrun DDP (CPU, gloo): a NaN in one rank's gradient makes every
rank skip the same step, the replicas stay identical, and the faulty rank is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keel.store import RunReader
from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed
HERE = Path(__file__).parent


def _ranks(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow  # `make test-all`
def test_hf_trainer_ranks_skip_together(tmp_path):
    pytest.importorskip("transformers")
    torchrun(HERE / "hf_worker.py", str(tmp_path))
    ranks = _ranks(tmp_path)
    assert ranks[0]["world"] == 2
    assert ranks[0]["actions"] == ranks[1]["actions"] == [[3, "skip"]]
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["named"] == ranks[1]["named"] == [1]
    with RunReader(tmp_path / "run") as store:
        assert [(d.step, d.action) for d in store.decisions()] == [(3, "skip")]


@pytest.mark.slow  # `make test-all`
def test_lightning_ddp_ranks_skip_together_with_per_rank_gradients(tmp_path):
    pytest.importorskip("lightning")
    torchrun(HERE / "lightning_worker.py", str(tmp_path))
    ranks = _ranks(tmp_path)
    assert ranks[0]["actions"] == ranks[1]["actions"] == [[4, "skip"]]
    assert ranks[0]["params"] == ranks[1]["params"] and ranks[0]["steps"] == 10
    assert ranks[0]["distributed"]["rank_stats"] is True  # the strategy's DDP module got keel's hook
    assert ranks[0]["named"] == [1]
    with RunReader(tmp_path / "run") as store:
        assert "rank/grad/local_norm/1" in store.signal_keys()
