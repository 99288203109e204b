"""Attribution and skip lists under torchrun: each rank trains on its own examples, the decisions stay alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # `make test-all`: three 2-rank runs, minutes

WORKER = Path(__file__).with_name("attribution_worker.py")


@pytest.mark.parametrize("poison", ["1.5", "30"])
def test_outliers_on_one_rank_skip_the_step_on_every_rank_and_reach_rank_0s_skip_list(tmp_path, poison):
    # 1.5: a spike the detectors rate info, skipped only because attribution pins it on rank 1's examples — before
    # the fix rank 1 skipped alone and the replicas' weights parted. 30: a critical spike every rank skips anyway —
    # before the fix the skip list stayed empty (rank 0 had no outliers; rank 1 writes no skip list).
    torchrun(WORKER, str(tmp_path), poison, nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    poisoned = ranks[1]["poisoned"]
    assert len(poisoned) == 2 and ranks[0]["poisoned"] == []
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == [[150, "skip"]]
    assert ranks[0]["params_equal"] and ranks[1]["params_equal"]
    assert ranks[0]["skip_listed"] == poisoned  # rank 0 writes the skip list, with rank 1's examples


def test_a_rollback_lists_every_ranks_ids_of_the_window_it_discards(tmp_path):
    torchrun(WORKER, str(tmp_path), "30", nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["rollback_decisions"] == ranks[1]["rollback_decisions"]
    rollback = [d for d in ranks[0]["rollback_decisions"] if d[1] == "rollback"]
    assert len(rollback) == 1
    step, _, restored = rollback[0]
    expected = sorted(r * 10000 + s * 8 + j for r in range(2) for s in range(restored, step + 1) for j in range(8))
    assert ranks[0]["rollback_skip_listed"] == expected
    assert ranks[0]["rollback_params_equal"]


def test_a_healthy_ranks_most_extreme_example_is_not_skip_listed_with_another_ranks_corrupt_one(tmp_path):
    torchrun(Path(__file__).with_name("attribution_healthy_worker.py"), str(tmp_path), nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == [[30, "skip"]]
    assert ranks[0]["healthy_outliers"]  # rank 0's batch alone has an example above z 6 ...
    assert ranks[0]["skip_listed"] == [981]  # ... but only rank 1's corrupt example carries the spike
