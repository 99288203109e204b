"""One collective per healthy DDP step: RankSync.to_host skips the layout check on a layout every rank has agreed on,
and a step on which rank 0 alone adds a key still reduces the shared keys and keeps the extra one rank-local."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.agreement_worker import ODD_STEP
from tests.distributed.launch import torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("agreement")
    torchrun(Path(__file__).with_name("agreement_worker.py"), str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# ~25 s on two busy cores: `make test-all`; test_sync's layout worker checks one healthy collective in the default suite
pytestmark = [pytest.mark.slow]


@pytest.mark.distributed
def test_a_healthy_step_is_one_collective_and_one_host_read(ranks):
    for result in ranks:
        steps = result["synced"]["steps"]
        # step 0: no agreed layout (check + values); step 1: a new layout (no late values): the one-collective try,
        # then check + values; from step 2 both layouts are agreed, and alternate without a check
        assert [s["collectives"] for s in steps][:4] == [2, 3, 1, 1]
        assert [s["collectives"] for s in steps][ODD_STEP + 1 :] == [1, 1, 1]
        assert [s["reads"] for s in steps][2:4] == [1, 1] and [s["reads"] for s in steps][ODD_STEP + 1 :] == [1] * 3
    # the step rank 0 alone adds a key: the try, the check, the layouts' exchange, the shared keys' reduction
    assert ranks[0]["synced"]["steps"][ODD_STEP]["collectives"] == ranks[1]["synced"]["steps"][ODD_STEP]["collectives"]
    assert ranks[0]["synced"]["steps"][ODD_STEP]["collectives"] == 4


@pytest.mark.distributed
def test_shared_keys_are_reduced_on_every_step_and_the_extra_key_stays_rank_local(ranks):
    for rank, result in enumerate(ranks):
        for step, got in enumerate(result["synced"]["steps"]):
            assert got["values"]["loss"] == 1.5 + step  # the mean of 1+step and 2+step
            assert got["values"]["attn/max_logit"] == 10.0 + step  # the max
            assert got["per_param"]["grad/norm/"] == [["a", "b"], [1.5, 3.0]]
            assert got["per_param"]["rank/loss/"] == [["0", "1"], [1.0 + step, 2.0 + step]]
            assert got["late"] == ({"update/norm": 3.0} if step % 3 == 0 else {})
            assert ("tps" in got["values"]) == (rank == 0 and step == ODD_STEP)
        assert ranks[0]["synced"]["steps"][ODD_STEP]["values"]["tps"] == 1234.0  # rank 0's own, not halved


@pytest.mark.distributed
def test_a_guard_decides_alike_on_every_rank_with_one_collective_per_healthy_step(ranks):
    guarded = [r["guarded"] for r in ranks]
    expected = ["ok"] * 9 + ["skip", "ok", "ok"]  # rank 1's NaN gradient at step 9 reaches both through the one try
    assert guarded[0]["actions"] == guarded[1]["actions"] == expected
    assert guarded[0]["params"] == guarded[1]["params"]
    for g in guarded:
        counts = g["collectives"]
        assert counts[ODD_STEP] == 4 and counts[9] == 4  # rank 0's extra key; the NaN step's parameter norms
        assert [c for i, c in enumerate(counts) if i >= 2 and i not in (ODD_STEP, 9)] == [1] * 8
    [(message, where)] = guarded[0]["warnings"]  # once, on the rank that measured the extra key, at the loop's line
    assert "rank 0 measured perf/tokens_per_s but not every rank did" in message
    assert where.endswith("agreement_worker.py")
    assert guarded[1]["warnings"] == []
