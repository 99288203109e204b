"""Lightning: a rollback raised the epoch loop's ``max_steps``; a ``fit(ckpt_path=...)`` from a checkpoint saved after
it stopped at the trainer's ``max_steps`` again, the step-interval schedule unfinished, and nothing said (reviewer V's
V4, its Lightning part). KeelCallback keeps the extension in its callback state and applies it again when the resumed
fit starts. A run a callback stopped (``trainer.should_stop``) is told so, not that "its data ran out"."""

from __future__ import annotations

import logging

import pytest

from keel import RecoveryConfig

L = pytest.importorskip("lightning")
from keel.integrations.lightning import KeelCallback  # noqa: E402
from tests.integrations.test_lightning import STEPS, fit  # noqa: E402
from tests.integrations.test_trl import CriticalAt  # noqa: E402


class SaveAndStopAt(L.Callback):
    """Saves a checkpoint at a step and stops the fit there, as a time budget does."""

    def __init__(self, at: int, path) -> None:
        self.at, self.path = at, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at and not trainer.should_stop:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _recover(**kwargs) -> KeelCallback:
    return KeelCallback(policy="recover", recovery=RecoveryConfig(snapshot_every=1, quiet_steps=0), **kwargs)


def test_a_resume_after_a_rollback_keeps_the_extended_run_and_finishes_the_schedule(tmp_path, caplog):
    keel = _recover(detectors=[CriticalAt(5)])
    with caplog.at_level(logging.WARNING, logger="keel"):
        fit([keel, SaveAndStopAt(8, tmp_path / "at8.ckpt")])
    undone = 5 + 1 - keel.guard.decisions[0].restored_step
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training was stopped")]
    assert stopped == [
        f"training was stopped at step 8 (the loop or a callback asked for it), before max_steps {STEPS + undone} "
        f"(extended after 1 rollback): the LR schedule is {STEPS + undone - 8} steps short of its end; a resume from "
        "a checkpoint saved after the rollback extends max_steps again"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer, _ = fit([_recover()], ckpt_path=str(tmp_path / "at8.ckpt"))
    assert trainer.global_step == trainer.fit_loop.max_steps == STEPS + undone
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS  # every planned update's schedule step
    said = [r.getMessage() for r in caplog.records if "max_steps" in r.getMessage()]
    assert said == [
        f"resumed at step 8 from a checkpoint of a run that rollbacks had extended by {undone} updates: the "
        f"Trainer's max_steps {STEPS} → {STEPS + undone} again, so its LR schedule reaches its end"
    ]
