"""A Guard per data-parallel group (``DistributedConfig(process_group=<subgroup>)``) under real torchrun processes,
every group given the job's one run_dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keel.store import RunReader
from tests.distributed.launch import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # 4 processes on 2 cores, twice: ~60 s

WORKER = Path(__file__).with_name("subgroup_worker.py")


def test_groups_sharing_one_run_dir_each_keep_their_own_run_in_it_and_resume_it(tmp_path):
    torchrun(WORKER, str(tmp_path), nproc=4)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r.get("error") for r in ranks] == [None] * 4  # the groups collided in the run_dir's parts
    assert ranks[0]["actions"] == ranks[1]["actions"] == ["ok"] * 3 + ["skip", "ok"]
    assert ranks[2]["actions"] == ranks[3]["actions"] == ["ok"] * 5
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["group-0", "group-2"]  # named by the group's first rank
    for group, skips in (("group-0", [(3, "skip")]), ("group-2", [])):
        with RunReader(run / group) as store:
            assert [(d.step, d.action) for d in store.decisions()] == skips
            assert store.meta()["distributed"]["world_size"] == 2
        assert sorted(p.name for p in (run / group).glob("rank-*")) == ["rank-0", "rank-1"]
    torchrun(WORKER, str(tmp_path), "resume", nproc=4)
    resumed = [json.loads((tmp_path / f"rank{r}-resumed.json").read_text()) for r in range(4)]
    assert [r.get("error") for r in resumed] == [None] * 4
    starts = [r["start"] for r in resumed]  # every group continues its own run from its own newest snapshot
    assert starts[0] == starts[1] > 0 and starts[2] == starts[3] > 0
