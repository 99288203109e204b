"""A warning pins the last state from before its onset, so a rollback still finds it after the ring turned over."""

import pytest
import torch

from keel._core.finding import Finding
from keel.recover import RecoveryConfig, SnapshotRing, TrainingState
from keel.recover.recovery import Recovery
from tests.conftest import TinyNet


def _state():
    torch.manual_seed(0)
    model = TinyNet()
    return model, TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def _train_to(model, value: float):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_a_pinned_snapshot_outlives_the_ring_and_its_buffers_are_not_reused():
    model, state = _state()
    ring = SnapshotRing(capacity=2, max_pinned=1)
    _train_to(model, 1.0)
    pinned = ring.take(10, state)
    ring.pin(pinned)
    for step in range(11, 16):
        ring.fence()  # as before every optimizer.step
        _train_to(model, float(step))
        ring.take(step, state)
    ring.fence()
    assert [s.step for s in ring.snapshots] == [14, 15]
    assert ring.newest_before(12) is pinned
    assert all(torch.all(t == 1.0) for k, t in pinned.tensors.items() if k.startswith("model/"))  # untouched


def test_pins_beyond_the_limit_release_the_oldest_and_a_rollback_drops_later_pins():
    model, state = _state()
    ring = SnapshotRing(capacity=1, max_pinned=2)
    snaps = [ring.take(step, state) for step in (0, 10, 20)]
    for snap in snaps:
        ring.pin(snap)
    assert [s.step for s in ring.pinned] == [10, 20]
    ring.drop_after(15)
    assert [s.step for s in ring.pinned] == [10]
    with pytest.raises(ValueError, match="max_pinned"):
        SnapshotRing(capacity=1, max_pinned=-1)


def _warning(step: int, onset: int) -> Finding:
    return Finding(
        step=step,
        kind="attention_entropy_collapse",
        severity="warning",
        signal="attn/entropy",
        value=0.5,
        baseline=3.0,
        evidence={"onset_step": onset},
    )


def test_a_critical_long_after_a_warning_rolls_back_to_the_state_before_its_onset():
    """The demo's recovering arm: warning at 180, critical at 390 — the ring (4 × 25 steps) has turned over."""
    model, state = _state()
    recovery = Recovery(state, RecoveryConfig(snapshot_every=25, keep_in_memory=4), None)
    for step in range(400):
        recovery.fence()
        _train_to(model, float(step))
        findings = (_warning(step, 180),) if step == 180 else ()
        recovery.note(step, findings, skipped=False)
        recovery.after_step(step + 1)
    result = recovery.rollback(400, onset=180, findings=(_warning(390, 180),), rollbacks_in_window=0)
    assert result is not None and result.snapshot.step == 176  # snapshots at 1, 26, …, 176: the last before 179
    assert all(torch.all(p == 175.0) for p in model.parameters())  # the state at the start of step 176


def test_without_pins_the_same_run_has_nothing_to_roll_back_to():
    model, state = _state()
    recovery = Recovery(state, RecoveryConfig(snapshot_every=25, keep_in_memory=4, keep_pinned=0), None)
    for step in range(400):
        recovery.note(step, (_warning(step, 180),) if step == 180 else (), skipped=False)
        recovery.after_step(step + 1)
    assert recovery.rollback(400, onset=180, findings=(), rollbacks_in_window=0) is None
    with pytest.raises(ValueError, match="keep_pinned"):
        RecoveryConfig(keep_pinned=-1)
