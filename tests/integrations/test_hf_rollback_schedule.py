"""A rollback inside the Hugging Face Trainer undoes updates, and the scheduler is restored with them, while the
Trainer's step count goes on: without more, the Trainer stops at ``max_steps`` with its LR schedule as many steps
short of the end, its annealing lost, and nobody told (helper H's H9: a cosine run ended at LR 2.5e-4 where the
bare schedule ends at 3e-6). `KeelCallback` raises the Trainer's ``state.max_steps`` by the updates undone (the
Trainer's loop honours it while its data lasts) and says so; ``extend_after_rollback=False`` keeps ``max_steps``
and says the schedule ends short."""

from __future__ import annotations

import logging

import pytest

from keel import RecoveryConfig
from keel.store import RunReader

transformers = pytest.importorskip("transformers")

from keel.integrations.hf import KeelCallback  # noqa: E402
from tests.integrations.test_hf import Inject, train  # noqa: E402

STEPS = 20  # the tiny GPT-2 of test_hf: 64 batches of 4 per epoch, so the epoch outlasts an extended max_steps


def _recover(tmp_path, **kwargs) -> KeelCallback:
    recovery = RecoveryConfig(snapshot_every=4, quiet_steps=1)
    return KeelCallback(run_dir=str(tmp_path / "run"), policy="recover", recovery=recovery, **kwargs)


def test_a_rollback_extends_max_steps_so_the_schedule_reaches_its_end(tmp_path, caplog):
    keel = _recover(tmp_path)
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer = train(tmp_path, [Inject({10: "param"}), keel], steps=STEPS, accumulate=1)
    [rollback] = keel.guard.decisions
    assert (rollback.step, rollback.action, rollback.restored_step) == (10, "rollback", 8)
    undone = 10 + 1 - 8  # the updates of steps 8, 9 and 10 (10's own was not applied)
    assert trainer.state.global_step == trainer.state.max_steps == STEPS + undone
    assert trainer.lr_scheduler.last_epoch == STEPS  # every planned update made: the linear schedule at its end
    assert set(trainer.lr_scheduler.get_last_lr()) == {0.0}
    assert trainer.args.max_steps == STEPS  # the user's arguments are left as they were
    lines = [r.getMessage() for r in caplog.records if "max_steps" in r.getMessage()]
    assert lines == [
        f"step 10: the rollback undid 3 updates: the Trainer's max_steps {STEPS} → {STEPS + 3}, so "
        "the run still makes its planned updates and its LR schedule reaches its end"
    ]
    with RunReader(tmp_path / "run") as store:
        assert store.meta()["hf"] == {
            "extend_after_rollback": True,
            "max_steps": {"planned": STEPS, "now": STEPS + 3},
            "rollbacks": [{"step": 10, "undone": 3}],
        }


def test_without_the_extension_the_run_ends_short_and_keel_says_so(tmp_path, caplog):
    keel = _recover(tmp_path, extend_after_rollback=False)
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer = train(tmp_path, [Inject({10: "param"}), keel], steps=STEPS, accumulate=1)
    assert trainer.state.global_step == trainer.state.max_steps == STEPS
    assert trainer.lr_scheduler.last_epoch == STEPS - 3  # what H9 found: the last 3 steps of the schedule never ran
    lines = [r.getMessage() for r in caplog.records if "max_steps" in r.getMessage()]
    assert lines == [
        f"step 10: the rollback undid 3 updates: the Trainer still stops at max_steps {STEPS}, its LR "
        f"schedule then 3 steps short of its end (extend_after_rollback=False)"
    ]


def test_a_run_whose_data_ends_first_is_told_its_schedule_ended_short(tmp_path, caplog):
    keel = _recover(tmp_path)  # 8 accumulation steps of 4: the 256 samples make exactly 8 updates, one epoch
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer = train(tmp_path, [Inject({4: "param"}), keel], steps=8, accumulate=8)
    [rollback] = keel.guard.decisions
    undone = 4 + 1 - rollback.restored_step
    assert trainer.state.global_step == 8 and trainer.state.max_steps == 8 + undone  # the epoch ended the run
    assert trainer.lr_scheduler.last_epoch == 8 - undone
    ends = [r.getMessage() for r in caplog.records if "ran out" in r.getMessage()]
    assert ends == [
        f"the Trainer stopped at step 8, before max_steps {8 + undone} (its data or its epochs ran out; extended "
        f"after 1 rollback): the LR schedule ended {undone} steps short of its end. Set max_steps with data to spare "
        "(or more epochs) to let it finish"
    ]


def test_the_option_is_checked_when_the_callback_is_built():
    with pytest.raises(ValueError, match=r"extend_after_rollback='yes'.*allowed: True or False"):
        KeelCallback(policy="recover", extend_after_rollback="yes")
