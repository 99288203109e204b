"""A rollback inside Lightning restores the step-interval LR scheduler with the model while ``trainer.global_step`` goes
on: stopped at ``max_steps``, the schedule ended short by the updates undone (the HF Trainer's H9, in Lightning).
`KeelCallback` raises the epoch loop's ``max_steps`` by them (Lightning reads it at every step) and says so."""

from __future__ import annotations

import logging

import pytest

from keel import RecoveryConfig

pytest.importorskip("lightning")
from keel.integrations.lightning import KeelCallback  # noqa: E402
from tests.integrations.test_lightning import STEPS, fit  # noqa: E402
from tests.integrations.test_trl import CriticalAt  # noqa: E402


def _recover(**kwargs) -> KeelCallback:
    recovery = RecoveryConfig(snapshot_every=1, quiet_steps=0)
    return KeelCallback(policy="recover", detectors=[CriticalAt(5)], recovery=recovery, **kwargs)


def test_a_rollback_extends_max_steps_so_the_schedule_reaches_its_end(caplog):
    keel = _recover()
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer, _ = fit([keel])
    [rollback] = keel.guard.decisions
    undone = 5 + 1 - rollback.restored_step
    assert trainer.global_step == trainer.fit_loop.max_steps == STEPS + undone
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS  # every planned update's schedule step
    said = [r.getMessage() for r in caplog.records if "max_steps" in r.getMessage()]
    assert said == [
        f"step 5: the rollback undid {undone} updates: the Trainer's max_steps {STEPS} → {STEPS + undone}, so the "
        "run still makes its planned updates and its LR schedule reaches its end"
    ]


def test_without_the_extension_the_schedule_ends_short():
    keel = _recover(extend_after_rollback=False)
    trainer, _ = fit([keel])
    undone = 5 + 1 - keel.guard.decisions[0].restored_step
    assert trainer.global_step == STEPS and trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS - undone
