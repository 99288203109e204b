"""The counters that keep the escalation ladder from looping survive a rollback, and come back on a disk resume.

A rollback restores the snapshot's model, optimizer and detector baselines, but not the run's record of its own
recovery (rollbacks so far, skips in a row, the actions in force): restoring that record would erase the
evidence that the ladder is looping.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel import Guard, RecoveryConfig, TrainingAborted
from keel._core import Finding
from keel.recover import DiskSnapshots, Escalation, EscalationConfig, SnapshotRing, TrainingState, restore
from keel.recover.actions import ActionState
from tests.conftest import TinyNet, make_batches


class AlwaysDiverging:
    """A custom detector that reports critical divergence on every step."""

    name = "always_diverging"

    def __init__(self) -> None:
        self.seen = 0

    def update(self, obs):
        self.seen += 1
        return [
            Finding(
                step=obs.step,
                kind="divergence",
                severity="critical",
                signal="loss",
                value=9.0,
                baseline=1.0,
                evidence={"onset_step": obs.step},
            )
        ]

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = int(state["seen"])


class DivergingEveryOtherStep(AlwaysDiverging):
    """Critical divergence on every even step: an update runs on each state restored before the next rollback, so
    the rollbacks may land on the same snapshot (`Recovery` goes further back only when none ran)."""

    name = "diverging_every_other_step"

    def update(self, obs):
        return super().update(obs) if obs.step % 2 == 0 else []


class AlwaysSpiking(AlwaysDiverging):
    """A critical loss spike on every step: skippable, so it loops through skips and rollbacks."""

    name = "always_spiking"

    def update(self, obs):
        return [Finding(step=obs.step, kind="loss_spike", severity="critical", signal="loss", value=9.0, baseline=1.0)]


def _run(detector, steps=40, recovery=None, **guard_kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model,
        opt,
        policy="recover",
        detectors=[detector],
        recovery=recovery or RecoveryConfig(snapshot_every=5, quiet_steps=1),
        **guard_kwargs,
    )
    decisions = []
    with pytest.raises(TrainingAborted) as aborted:
        for x, y in make_batches(steps):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            decisions.append(guard.step(loss))
            opt.zero_grad()
    guard.close()
    return guard, decisions, aborted.value


def test_rollbacks_repeating_within_a_window_end_in_abort():
    guard, decisions, aborted = _run(DivergingEveryOtherStep())
    cap = guard.escalation.config.max_rollbacks
    assert [d.action for d in decisions] == ["rollback", "ok"] * cap
    assert aborted.decision.action == "abort" and aborted.decision.step == 2 * cap
    assert f"{cap} rollbacks within" in aborted.decision.reason
    assert guard.recovery.rollbacks == cap


def test_the_rollback_cap_is_set_from_the_guard_through_recovery_config():
    recovery = RecoveryConfig(snapshot_every=5, quiet_steps=1, max_rollbacks=5, rollback_window=1000, min_lr_scale=1e-9)
    guard, decisions, aborted = _run(DivergingEveryOtherStep(), recovery=recovery, max_consecutive_skips=4)
    assert (guard.escalation.config.max_rollbacks, guard.escalation.config.rollback_window) == (5, 1000)
    assert guard.escalation.config.max_consecutive_skips == 4
    assert [d.action for d in decisions] == [
        "rollback",
        "ok",
    ] * 5 and "5 rollbacks within 1000" in aborted.decision.reason


@pytest.mark.parametrize("field", ["max_rollbacks", "rollback_window"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None, "3"])
def test_a_bad_rollback_cap_is_one_clear_error(field, bad):
    with pytest.raises(ValueError, match=f"RecoveryConfig.{field}"):
        RecoveryConfig(**{field: bad})


def test_lr_backoff_compounds_over_rollbacks_to_the_same_snapshot():
    guard, decisions, _ = _run(DivergingEveryOtherStep())
    rollbacks = [d for d in decisions if d.action == "rollback"]
    assert all(d.restored_step == 0 for d in rollbacks)  # every rollback lands on the starting state
    assert guard.recovery.actions.lr_scale == pytest.approx(0.1 ** len(rollbacks))
    assert "LR × 0.001" in rollbacks[-1].reason


def test_a_rollback_with_no_update_since_the_last_one_never_restores_the_same_state_again():
    """Every step in trouble: the starting state restored at step 0 reproduces it before any update, and there is
    nothing older — the run aborts at the second rollback instead of restoring it until the cap."""
    guard, decisions, aborted = _run(AlwaysDiverging())
    assert [d.action for d in decisions] == ["rollback"] and aborted.decision.step == 1
    assert "the snapshot of step 0 restored at step 0 was still in trouble" in aborted.decision.reason


def test_skips_that_repeat_after_every_rollback_end_in_abort():
    guard, decisions, aborted = _run(AlwaysSpiking(), steps=200, max_consecutive_skips=3)
    actions = [d.action for d in decisions]
    # the third spike in a row blames the weights (a rollback); spikes that go on with the restored weights are the
    # data: skipped up to the cap, then a rollback would restore the same state again
    assert actions == ["skip"] * 2 + ["rollback"] + ["skip"] * 3
    assert aborted.decision.action == "abort" and "still in trouble" in aborted.decision.reason


def _state():
    torch.manual_seed(0)
    model = TinyNet()
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    state.history["escalation"] = Escalation(EscalationConfig(policy="recover"))
    state.history["actions"] = ActionState()
    return state


def _take(state, step):
    ring = SnapshotRing()
    snap = ring.take(step, state)
    ring.fence()
    return snap


def test_history_survives_a_rollback_and_is_restored_on_resume(tmp_path):
    state = _state()
    snap = _take(state, 0)
    state.history["escalation"].rollback_steps = [3, 4]
    state.history["actions"].lr_scale = 0.01
    restore(state, snap.tensors, snap.skeleton, snap.plain, resume=False)
    assert state.history["escalation"].rollback_steps == [3, 4] and state.history["actions"].lr_scale == 0.01

    state.history["escalation"].rollback_steps = [7]
    disk = DiskSnapshots(tmp_path)
    disk.save(_take(state, 8))
    fresh = _state()
    loaded = disk.load_newest()
    restore(fresh, loaded.tensors, loaded.skeleton, loaded.plain, resume=True)
    assert fresh.history["escalation"].rollback_steps == [7] and fresh.history["actions"].lr_scale == 0.01


def test_a_disk_snapshot_written_before_the_rename_resumes_with_its_lr_backoff(tmp_path):
    # keel kept the post-rollback actions' state under history["remedy"] before they were called actions; a
    # resume from such a snapshot must keep its LR back-off, not silently start again at LR × 1.
    old = _state()
    old.history["remedy"] = old.history.pop("actions")
    old.history["remedy"].lr_scale, old.history["remedy"].lr_scale_since = 0.01, 5
    DiskSnapshots(tmp_path).save(_take(old, 8))
    fresh = _state()
    loaded = DiskSnapshots(tmp_path).load_newest()
    restore(fresh, loaded.tensors, loaded.skeleton, loaded.plain, resume=True)
    assert (fresh.history["actions"].lr_scale, fresh.history["actions"].lr_scale_since) == (0.01, 5)


class DivergingEvery(AlwaysDiverging):
    """Critical divergence every ``period`` steps of its own count (it keeps counting across rollbacks)."""

    name = "diverging_every"

    def __init__(self, period: int) -> None:
        super().__init__()
        self.period, self.calls = period, 0

    def update(self, obs):
        self.calls += 1
        return super().update(obs) if self.calls % self.period == 0 else []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_lr_backoffs_spaced_wider_than_the_window_stop_at_min_lr_scale():
    # rollbacks further apart than the escalation window never reach max_rollbacks; without a floor the
    # LR back-off compounded without end (×1e-10 after ten)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model,
        opt,
        policy="recover",
        detectors=[DivergingEvery(15)],
        recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1, min_lr_scale=1e-3),
    )
    guard.escalation.config.rollback_window = 10
    decisions = []
    with pytest.raises(TrainingAborted, match=r"another back-off would take it below min_lr_scale=0.001"):
        for x, y in make_batches(200):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            decisions.append(guard.step(loss))
            opt.zero_grad()
    guard.close()
    assert [d.action for d in decisions if d.action != "ok"] == ["rollback"] * 3
    assert guard.recovery.actions.lr_scale == pytest.approx(1e-3)
    assert guard.decisions[-1].action == "abort" and "LR is already scaled by 0.001" in guard.decisions[-1].reason


def test_min_lr_scale_is_checked():
    with pytest.raises(ValueError, match=r"RecoveryConfig.min_lr_scale=0; allowed"):
        RecoveryConfig(min_lr_scale=0)
