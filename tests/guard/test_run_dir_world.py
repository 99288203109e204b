"""A resume continues a run's snapshots only with the number of ranks that wrote them (reviewer V2 of session 13:
a 2-rank run resumed in one process started over with a false "no disk snapshot" and left two sets of snapshots)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from keel import Guard, RecoveryConfig
from keel.guard.run_dir import _other_world
from tests.conftest import TinyNet, make_batches


def _train(run_dir, **kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, run_dir=str(run_dir), recovery=RecoveryConfig(snapshot_every=2, disk_every=1), **kwargs)
    for x, y in make_batches(6):
        F.mse_loss(model(x), y).backward()
        guard.step(F.mse_loss(model(x), y).detach())
        opt.zero_grad()
    guard.close()


def _as_ranks(run_dir, ranks):
    """The folder as a run on ``ranks`` ranks leaves it: each rank's snapshots in rank-<r>/snapshots."""
    for r in range(ranks):
        shutil.copytree(run_dir / "snapshots", run_dir / f"rank-{r}" / "snapshots")
    shutil.rmtree(run_dir / "snapshots")


def test_a_run_written_by_two_ranks_is_not_resumed_in_one_process(tmp_path):
    _train(tmp_path)
    _as_ranks(tmp_path, 2)
    with pytest.raises(ValueError, match=r"written by 2 ranks \(rank-0..rank-1/snapshots\), and this run has one "):
        _train(tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["rank-0", "rank-1"]  # nothing written


def test_the_folder_says_which_number_of_ranks_may_continue_it(tmp_path):
    assert _other_world(tmp_path, None) is None and _other_world(tmp_path, 4) is None  # nothing to continue
    _train(tmp_path)
    assert _other_world(tmp_path, None) is None
    assert "written by one process (snapshots/), and this run has 2 ranks" in _other_world(tmp_path, 2)
    (tmp_path / "rank-0" / "snapshots").mkdir(parents=True)  # a rank folder with no snapshot in it: not a rank's run
    assert _other_world(tmp_path, None) is None
    shutil.rmtree(tmp_path / "rank-0")
    _as_ranks(tmp_path, 2)
    assert _other_world(tmp_path, 2) is None
    assert "written by 2 ranks (rank-0..rank-1/snapshots), and this run has 3 ranks" in _other_world(tmp_path, 3)
    shutil.copytree(tmp_path / "rank-0" / "snapshots", tmp_path / "snapshots")  # both: a resume that went wrong
    said = _other_world(tmp_path, 2)
    assert "written by one process (snapshots/) and 2 ranks (rank-0..rank-1/snapshots)" in said
    assert "allowed: resume with the number of ranks the run had, or overwrite=True" in said
