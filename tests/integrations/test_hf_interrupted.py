"""An HF train() that ended without on_train_end, and a Trainer and keel resuming at once (reviewer V18, V17 of
session 13): the first left keel's Guard open — run_dir locked, Tensor.backward and optimizer.step gated for the rest
of the process; the second let keel's snapshot silently replace the Trainer's checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch

import keel
from keel import KeelWarning, RecoveryConfig
from keel.store import RunReader

pytest.importorskip("transformers")
from transformers import TrainerCallback  # noqa: E402

from keel.integrations.hf import KeelCallback  # noqa: E402
from tests.integrations.test_hf import train  # noqa: E402


class Interrupt(TrainerCallback):
    """Ctrl-C in a notebook at a given step."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_an_interrupted_train_is_closed_before_the_next_one_and_its_run_dir_can_be_used_again(tmp_path):
    first = KeelCallback(run_dir=str(tmp_path / "a"), policy="skip")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, [Interrupt(3), first])
    gate = torch.Tensor.backward
    assert first._handoff._patches and not first.guard._closed  # still gated and open: the Trainer said nothing
    again = KeelCallback(run_dir=str(tmp_path / "a"), policy="skip", overwrite=True)  # the cell run again
    with pytest.warns(KeelWarning, match=r"ended without on_train_end .* its Guard is closed now"):
        train(tmp_path, [again], steps=4)
    assert torch.Tensor.backward is not gate and not first._handoff._patches and first.guard._closed
    with RunReader(tmp_path / "a") as store:
        assert store.meta()["status"] == "finished" and store.meta()["steps"] == 4


def test_the_trainer_and_keel_resuming_at_once_is_refused_naming_both_steps(tmp_path):
    snapshots = RecoveryConfig(snapshot_every=2, disk_every=1)
    train(
        tmp_path,
        [KeelCallback(run_dir=str(tmp_path / "k"), recovery=snapshots)],
        steps=6,
        save_strategy="steps",
        save_steps=4,
    )
    both = KeelCallback(run_dir=str(tmp_path / "k"), recovery=snapshots, resume=True)
    with pytest.raises(
        ValueError, match=r"the Trainer resumed from its checkpoint at step 4 and keel from its snapshot"
    ):
        train(
            tmp_path, [both], steps=8, save_strategy="steps", save_steps=4, resume=str(tmp_path / "hf" / "checkpoint-4")
        )
    assert not both._handoff._patches and both.guard._closed  # nothing left gated, the Guard closed
    model = torch.nn.Linear(2, 2)
    keel.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "k", overwrite=True).close()


def test_a_first_train_whose_keel_run_resumed_past_step_0_says_the_trainer_starts_over(tmp_path, caplog):
    # the same command after a kill, with KeelCallback(resume=True) and no resume_from_checkpoint: keel restored its
    # snapshot of step 6, the Trainer started at 0 and trained max_steps again on top of it (helper R's R10: 85
    # updates stored for a 60-step run, batches 0-24 twice, the schedule past its end), and nothing was said
    snapshots = RecoveryConfig(snapshot_every=2, disk_every=1)
    train(tmp_path, [KeelCallback(run_dir=str(tmp_path / "k"), recovery=snapshots)], steps=6)
    again = KeelCallback(run_dir=str(tmp_path / "k"), recovery=snapshots, resume=True)
    with caplog.at_level(logging.WARNING, logger="keel"):
        train(tmp_path, [again], steps=4)
    said = [r.getMessage() for r in caplog.records if "the Trainer starts at step 0" in r.getMessage()]
    assert len(said) == 1 and "resumed its run at step 6" in said[0] and "its 4 steps again" in said[0]
    assert "resume_from_checkpoint" in said[0]


def test_a_second_train_with_the_same_resuming_callback_says_nothing_of_it(tmp_path, caplog):
    # the documented use of resume=True: a second train() with the same callback continues keel's run on purpose
    both = KeelCallback(
        run_dir=str(tmp_path / "k"), recovery=RecoveryConfig(snapshot_every=2, disk_every=1), resume=True
    )
    with caplog.at_level(logging.WARNING, logger="keel"):
        train(tmp_path, [both], steps=4)
        train(tmp_path, [both], steps=4)
    assert not [r for r in caplog.records if "the Trainer starts at step 0" in r.getMessage()]
    assert both.guard.global_step == 8
