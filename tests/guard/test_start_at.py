"""`Guard.start_at`: a run a trainer continues from its own checkpoint, in a new run folder, numbered from the
trainer's step."""

import math

import pytest
import torch
import torch.nn.functional as F

from keel import Finding, Guard, RecoveryConfig
from keel.store import RunReader
from tests.conftest import TinyNet, make_batches


def _guard(run_dir, **kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return Guard(model, opt, run_dir=str(run_dir), **kwargs), model, opt


def _steps(guard, model, opt, n):
    for x, y in make_batches(n):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()


def test_the_steps_findings_and_rows_start_at_the_given_step(tmp_path):
    guard, model, opt = _guard(tmp_path, policy="recover", recovery=RecoveryConfig(snapshot_every=2))
    assert guard.start_at(100) is guard
    _steps(guard, model, opt, 5)
    guard.close()
    assert guard.global_step == 105
    assert [s.step for s in guard.recovery.ring.snapshots][:1] == [100]  # the first snapshot is of step 100
    with RunReader(tmp_path) as run:
        assert run.signal("loss")[0].tolist() == [100, 101, 102, 103, 104] and run.meta()["first_step"] == 100


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None, 2**62])
def test_a_bad_step_is_one_clear_error(tmp_path, bad):
    guard, _, _ = _guard(tmp_path)
    with pytest.raises(ValueError, match=r"start_at\(step=.*allowed: an int from 0"):
        guard.start_at(bad)
    guard.close()


def test_after_a_step_or_a_resume_it_is_refused(tmp_path):
    guard, model, opt = _guard(tmp_path / "a")
    _steps(guard, model, opt, 1)
    with pytest.raises(ValueError, match="has stepped already"):
        guard.start_at(10)
    guard.close()
    run, model, opt = _guard(tmp_path / "b", policy="recover", recovery=RecoveryConfig(snapshot_every=2, disk_every=1))
    _steps(run, model, opt, 5)
    run.recovery.disk.wait()
    run.close()
    resumed, _, _ = _guard(tmp_path / "b", policy="recover", resume=True)
    with pytest.raises(ValueError, match="resumed the run from its snapshot"):
        resumed.start_at(10)
    resumed.close()


def test_resumed_says_whether_the_guard_continued_a_run(tmp_path):
    # snapshot_every=100: the snapshot of step 0 is the only one written
    guard, model, opt = _guard(tmp_path, policy="recover", recovery=RecoveryConfig(snapshot_every=100, disk_every=1))
    assert not guard.resumed
    _steps(guard, model, opt, 1)
    guard.recovery.disk.wait()
    guard.close()
    again, _, _ = _guard(tmp_path, policy="recover", resume=True)
    assert again.resumed and again.global_step == 0  # a snapshot of step 0: a trainer must not renumber it
    again.close()


class _CriticalAtFirstStep:
    """A critical finding (a KL blow-up's shape) at the run's first step, with its onset there."""

    name = "critical_at_first_step"

    def __init__(self) -> None:
        self.first = None

    def update(self, obs):
        self.first = obs.step if self.first is None else self.first
        if obs.step != self.first:
            return []
        return [
            Finding(
                step=obs.step,
                kind="kl_blowup",
                severity="critical",
                signal="rl/kl",
                value=math.nan,
                evidence={"onset_step": obs.step},
            )
        ]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("first", [0, 100])
def test_trouble_at_the_first_step_rolls_back_to_the_starting_state_whatever_the_first_step(tmp_path, first):
    """A run numbered from start_at(N) (a trainer resumed from its own checkpoint) aborted 'no snapshot from before
    step N' for trouble whose onset is its first step, where a run from 0 rolls back (reviewer h26 V14)."""
    guard, model, opt = _guard(
        tmp_path, policy="recover", recovery=RecoveryConfig(snapshot_every=2), detectors=[_CriticalAtFirstStep()]
    )
    guard.start_at(first)
    _steps(guard, model, opt, 3)
    guard.close()
    rollback = guard.decisions[0]
    assert (rollback.step, rollback.action, rollback.restored_step) == (first, "rollback", first)
