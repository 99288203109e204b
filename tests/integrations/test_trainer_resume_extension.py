"""A rollback raised the Trainer's ``state.max_steps`` by the updates it undid; a resume from a Trainer checkpoint
saved after it (``resume_from_checkpoint`` with a new KeelCallback, the docs' route) recomputed ``max_steps`` from the
arguments and stopped 3 updates early, its LR schedule unfinished, and nothing said (reviewer V's V4). keel keeps the
extension in the checkpoint's ``trainer_state.json`` and applies it again when the resumed ``train()`` begins. A run a
callback stopped on purpose is told so, not that "its data ran out"."""

from __future__ import annotations

import json
import logging

import pytest

from keel import RecoveryConfig

pytest.importorskip("transformers")
from transformers import TrainerCallback  # noqa: E402

from keel.integrations.hf import KeelCallback  # noqa: E402
from tests.integrations.test_hf import Inject, train  # noqa: E402

STEPS = 10


class StopAt(TrainerCallback):
    """Stops training at a step, as EarlyStoppingCallback or a time budget does."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_training_stop = True


def _recover(path) -> KeelCallback:
    return KeelCallback(run_dir=str(path), policy="recover", recovery=RecoveryConfig(snapshot_every=2, quiet_steps=1))


def test_a_resume_after_a_rollback_keeps_the_extended_run_and_finishes_the_schedule(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="keel"):
        keel = _recover(tmp_path / "first")
        train(
            tmp_path,
            [Inject({6: "param"}), keel, StopAt(8)],
            steps=STEPS,
            accumulate=1,
            save_strategy="steps",
            save_steps=8,
        )
    [rollback] = keel.guard.decisions
    undone = 6 + 1 - rollback.restored_step
    checkpoint = tmp_path / "hf" / "checkpoint-8"
    kept = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["keel"]
    assert kept["extended_by"] == undone
    stopped = [r.getMessage() for r in caplog.records if "step 8" in r.getMessage() and "max_steps" in r.getMessage()]
    assert stopped == [
        f"training was stopped at step 8 (the loop or a callback asked for it), before max_steps {STEPS + undone} "
        f"(extended after 1 rollback): the LR schedule is {STEPS + undone - 8} steps short of its end; a resume from "
        "a checkpoint saved after the rollback extends max_steps again"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keel"):
        resumed = train(tmp_path, [_recover(tmp_path / "second")], steps=STEPS, accumulate=1, resume=str(checkpoint))
    assert resumed.state.global_step == resumed.state.max_steps == STEPS + undone
    assert resumed.lr_scheduler.last_epoch == STEPS and set(resumed.lr_scheduler.get_last_lr()) == {0.0}
    said = [r.getMessage() for r in caplog.records if "max_steps" in r.getMessage()]
    assert said == [
        f"resumed at step 8 from a checkpoint of a run that rollbacks had extended by {undone} updates: the "
        f"Trainer's max_steps {STEPS} → {STEPS + undone} again, so its LR schedule reaches its end"
    ]


def test_a_checkpoint_saved_while_keel_clips_records_the_users_max_grad_norm(tmp_path):
    """keel clips in the Trainer's place under skip/recover (its ``max_grad_norm`` set to 0 meanwhile), and every
    checkpoint's ``training_args.bin`` said the run was trained without clipping (reviewer V's V7)."""
    torch = pytest.importorskip("torch")
    seen = []

    class ClipsAt(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append(args.max_grad_norm)  # what the Trainer clipped with just before

    keel = KeelCallback(policy="skip")
    train(tmp_path, [keel, ClipsAt()], steps=2, accumulate=1, save_strategy="steps", save_steps=1)
    assert keel._clip is None and seen == [0.0, 0.0]  # keel clipped, the Trainer did not
    for step in (1, 2):
        saved = torch.load(tmp_path / "hf" / f"checkpoint-{step}" / "training_args.bin", weights_only=False)
        assert saved.max_grad_norm == 1.0
