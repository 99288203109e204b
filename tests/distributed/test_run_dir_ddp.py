"""Claiming a run_dir under torchrun: every rank agrees, refuses together, and resumes the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("run_dir_worker.py")


def test_every_rank_refuses_a_folder_one_rank_finds_used_and_every_rank_resumes_the_same_run(tmp_path):
    torchrun(WORKER, str(tmp_path), nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert "holds a previous run" in ranks[1]["refused"] and "rank-1" in ranks[1]["refused"]
    assert "rank 1 of this run could not claim its part" in ranks[0]["refused"]
    assert ranks[0]["new_run_id"] == ranks[1]["new_run_id"]  # rank 0's id, shared
    for r in ranks:
        assert r["resumed_run_id"] == r["new_run_id"] and r["resumed_steps"] == 8
        assert r["snapshots"] == ["step-000000006", "step-000000008"]
    # a write cut short on rank 1 (V3): every rank continues from step 6, the newest all hold; rank 0 says why
    assert [r["cut_resumed_from"] for r in ranks] == [6, 6]
    assert ranks[0]["cut_warnings"] == [
        "resume: rank 0 holds a snapshot of step 8, but not every rank does (a write cut short when the job "
        "stopped): every rank continues from the newest step all hold (6)"
    ]
    assert ranks[1]["cut_warnings"] == []
    # rank 1's newest snapshot damaged on disk (V14): rank 1 loads step 8, and rank 0 goes back to it too
    assert [r["corrupt_resumed_from"] for r in ranks] == [8, 8]
    assert ranks[0]["corrupt_warnings"] == [
        "resume: rank 0 loaded the snapshot of step 10, but another rank could not (it was corrupt or missing "
        "there): every rank continues from step 8"
    ]
