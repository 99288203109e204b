"""Where a rollback goes: before the earliest onset of the episode's open warnings, never back onto a restored state
that was still in trouble, and the actions after a one-off corrupted parameter (h21 trial, F2 and F3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel import Guard, RecoveryConfig, TrainingAborted
from keel._core import keys
from keel._core.finding import Finding
from keel.recover import TrainingState
from keel.recover.actions import choose_actions
from keel.recover.recovery import Recovery, RecoveryExhausted
from tests.conftest import TinyNet, make_batches


def _finding(step: int, kind: str, severity: str, onset: int | None = None, signal: str = keys.LOSS) -> Finding:
    evidence = {} if onset is None else {"onset_step": onset}
    return Finding(step=step, kind=kind, severity=severity, signal=signal, value=9.0, baseline=1.0, evidence=evidence)


def _recovery(**config) -> tuple[TinyNet, Recovery]:
    torch.manual_seed(0)
    model = TinyNet()
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    return model, Recovery(state, RecoveryConfig(**config), None)


def _run(recovery: Recovery, model: TinyNet, steps: range, findings: dict[int, tuple[Finding, ...]]) -> None:
    """Healthy updates (each parameter set to the step) but for the findings given; snapshots as the Guard takes."""
    for step in steps:
        recovery.fence()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        recovery.note(step, findings.get(step, ()), skipped=False)
        recovery.after_step(step + 1)


# The F2 pattern: the loss-spike detector warns at 44 of a rise that began at 42; the divergence detector goes
# critical at 52 with its own later onset 49. Snapshots: 1, 26 (every 25), then 45 and 50 (every 5: warning open).
SPIKE_WARNING = _finding(44, "loss_spike", "warning", onset=42)
DIVERGENCE = _finding(52, "divergence", "critical", onset=49)


def test_a_rollback_goes_before_the_onset_of_a_warning_still_open_not_the_critical_findings_later_one():
    model, recovery = _recovery()
    _run(recovery, model, range(52), {44: (SPIKE_WARNING,)})
    result = recovery.rollback(52, 49, (DIVERGENCE,), rollbacks_in_window=1)
    assert result is not None
    assert result.snapshot.step == 26  # not 45, taken while the warning was open
    assert result.onset == 42 and "loss_spike warning on loss of step 44" in result.onset_from
    assert all(torch.all(p == 25.0) for p in model.parameters())


def test_a_healthy_stretch_closes_the_warning_and_the_critical_findings_onset_counts_again():
    model, recovery = _recovery(snapshot_every=10)
    _run(recovery, model, range(60), {5: (_finding(5, "loss_spike", "warning", onset=4),)})  # quiet from 6 to 59
    result = recovery.rollback(60, 55, (_finding(60, "divergence", "critical", onset=55),), rollbacks_in_window=1)
    assert result is not None and result.snapshot.step == 51 and (result.onset, result.onset_from) == (55, "")


def test_a_warning_older_than_every_snapshot_kept_falls_back_to_the_critical_onset_and_says_so():
    model, recovery = _recovery(keep_pinned=0, keep_in_memory=2)
    _run(recovery, model, range(70), {44: (SPIKE_WARNING,), 60: (_finding(60, "loss_spike", "warning", onset=58),)})
    result = recovery.rollback(70, 66, (_finding(70, "divergence", "critical", onset=66),), rollbacks_in_window=1)
    assert result is not None and result.snapshot.step == 65  # ring: 60, 65; nothing kept from before 41
    assert result.onset == 66 and "no snapshot kept is from before the onset (step 42)" in result.onset_from


def test_warnings_of_the_abandoned_timeline_do_not_steer_the_next_rollback():
    model, recovery = _recovery()
    _run(recovery, model, range(52), {44: (SPIKE_WARNING,)})
    assert recovery.rollback(52, 49, (DIVERGENCE,), rollbacks_in_window=1).snapshot.step == 26
    recovery.note(52, (SPIKE_WARNING, DIVERGENCE), skipped=True)  # the rollback step's own record
    _run(recovery, model, range(53, 100), {})
    result = recovery.rollback(100, 95, (_finding(100, "divergence", "critical", onset=95),), rollbacks_in_window=1)
    assert result is not None and result.snapshot.step == 73 and (result.onset, result.onset_from) == (95, "")


def test_a_second_rollback_with_no_update_since_the_first_goes_to_an_older_snapshot():
    """F2b: the state restored was still in trouble (every step since was skipped): restoring it again repeats them."""
    model, recovery = _recovery(snapshot_every=5)
    _run(recovery, model, range(30), {})
    first = recovery.rollback(30, 30, (), rollbacks_in_window=1)
    assert first is not None and first.snapshot.step == 26
    for step in range(30, 41):
        recovery.note(step, (_finding(step, "loss_spike", "critical"),), skipped=True)
    second = recovery.rollback(41, 31, (), rollbacks_in_window=2)
    assert second is not None and second.snapshot.step == 21
    assert "the snapshot of step 26 restored at step 30 was still in trouble" in second.onset_from
    _run(recovery, model, range(41, 50), {})  # updates ran on the state restored: it was fine
    assert recovery.rollback(50, 48, (), rollbacks_in_window=3).snapshot.step == 47


def test_a_restored_state_still_in_trouble_with_nothing_older_is_an_abort_not_a_loop():
    _, recovery = _recovery(snapshot_every=5)
    assert recovery.rollback(3, 3, (), rollbacks_in_window=1) is None  # no snapshot yet: the Guard aborts
    recovery.after_step(0)
    assert recovery.rollback(3, 3, (), rollbacks_in_window=1).snapshot.step == 0
    recovery.note(3, (), skipped=True)
    with pytest.raises(RecoveryExhausted, match="snapshot of step 0 restored at step 3 was still in trouble"):
        recovery.rollback(4, 4, (), rollbacks_in_window=2)


def test_the_open_warning_and_the_unproven_rollback_survive_a_resume():
    _, recovery = _recovery()
    recovery.note(44, (SPIKE_WARNING,), skipped=False)
    state = recovery.state_dict()
    _, resumed = _recovery()
    resumed.load_state_dict(state)
    assert resumed._open_episode(50, ()) == (42, "the loss_spike warning on loss of step 44")
    old = {k: v for k, v in state.items() if k not in ("episode", "unproven")}  # a snapshot from before this key
    resumed.load_state_dict(old)
    assert resumed._open_episode(50, ()) is None


class _Script:
    """A detector that reports the findings scripted for each step (keyed by the step it sees)."""

    name = "script"

    def __init__(self, script: dict[int, list[Finding]]) -> None:
        self.script = script

    def update(self, obs):
        return list(self.script.get(obs.step, []))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _guard_run(script: dict[int, list[Finding]], steps: int, corrupt_at: tuple[int, ...] = (), **guard_kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    detectors = [_Script(script)] if script else None  # None: the default detectors, which read the parameters
    guard = Guard(model, opt, policy="recover", detectors=detectors, **guard_kwargs)
    decisions = []
    try:
        for step, (x, y) in enumerate(make_batches(steps)):
            if step in corrupt_at:
                with torch.no_grad():
                    model.fc2.weight[0, 0] = float("inf")  # the user's code, or a bit flip, between two steps
            loss = F.mse_loss(model(x), y)
            loss.backward()
            decisions.append(guard.step(loss))
            opt.zero_grad()
    except TrainingAborted as aborted:
        decisions.append(aborted.decision)
    guard.close()
    return guard, decisions


def test_the_guard_records_which_open_warning_set_the_rollback_target():
    guard, decisions = _guard_run({44: [SPIKE_WARNING], 52: [DIVERGENCE]}, 53)
    [rollback] = [d for d in decisions if d.action == "rollback"]
    assert rollback.step == 52 and rollback.onset == 42 and rollback.restored_step is not None
    assert rollback.restored_step <= 41
    assert "trouble began at step 42: the onset of the loss_spike warning on loss of step 44" in rollback.reason


def test_the_guard_never_restores_the_same_damaged_snapshot_twice_in_a_row():
    """Criticals on every step from 30: each rollback lands further back, and the cap still ends the run."""
    script = {s: [_finding(s, "loss_spike", "critical")] for s in range(30, 200)}
    guard, decisions = _guard_run(script, 200, max_consecutive_skips=3, recovery=RecoveryConfig(snapshot_every=5))
    restored = [d.restored_step for d in decisions if d.action == "rollback"]
    assert restored == sorted(set(restored), reverse=True) and len(restored) >= 2
    assert decisions[-1].action == "abort"


def _parameter_non_finite(step: int) -> Finding:
    return _finding(step, "non_finite", "critical", signal=keys.PARAM_NORM)


def test_a_parameter_written_inf_after_healthy_steps_is_rolled_back_without_an_lr_backoff():
    guard, decisions = _guard_run({}, 40, corrupt_at=(23,), recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1))
    [rollback] = [d for d in decisions if d.action == "rollback"]
    assert rollback.step == 23 and "actions: none needed" in rollback.reason
    assert guard.recovery.actions.lr_scale == 1.0
    assert all(d.action == "ok" for d in decisions[24:])


def test_a_second_corrupted_parameter_within_the_window_backs_the_lr_off():
    guard, decisions = _guard_run({}, 40, corrupt_at=(15, 30), recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1))
    rollbacks = [d for d in decisions if d.action == "rollback"]
    assert [d.step for d in rollbacks] == [15, 30]
    assert "none needed" in rollbacks[0].reason and "LR × 0.1" in rollbacks[1].reason
    assert guard.recovery.actions.lr_scale == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("calm_before", "rollbacks_in_window", "expected"),
    [
        (True, 1, []),  # written between healthy steps: the snapshot predates it, moments included
        (False, 1, ["lr_backoff", "reset_moments"]),  # trouble before: an update overflowed
        (True, 2, ["lr_backoff", "reset_moments"]),  # a repeat within the window
    ],
)
def test_non_finite_parameters_back_the_lr_off_only_when_an_update_made_them(
    calm_before, rollbacks_in_window, expected
):
    found = (_parameter_non_finite(10), _finding(10, "non_finite", "critical", signal=keys.GRAD_NORM))
    assert choose_actions(found, rollbacks_in_window, calm_before=calm_before) == expected


def test_a_parameter_overflowing_after_skipped_spikes_is_lr_caused():
    script = {s: [_finding(s, "loss_spike", "critical")] for s in (20, 21)} | {22: [_parameter_non_finite(22)]}
    guard, decisions = _guard_run(script, 30, recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1))
    [rollback] = [d for d in decisions if d.action == "rollback"]
    assert rollback.step == 22 and "LR × 0.1" in rollback.reason


def test_skips_do_not_hold_a_warning_open_for_hundreds_of_steps():
    """Review of session 10: one-off skips every 20 steps kept a step-10 warning open until a divergence at step 1000,
    whose rollback then restored the snapshot of step 1 although one of step 991 was kept."""
    import torch

    from keel import RecoveryConfig
    from keel._core import keys
    from keel._core.finding import Finding
    from keel.recover import TrainingState
    from keel.recover.recovery import Recovery
    from tests.conftest import TinyNet

    def finding(step, kind, severity, onset=None, signal=keys.LOSS):
        evidence = {} if onset is None else {"onset_step": onset}
        return Finding(
            step=step, kind=kind, severity=severity, signal=signal, value=9.0, baseline=1.0, evidence=evidence
        )

    torch.manual_seed(0)
    model = TinyNet()
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    recovery = Recovery(state, RecoveryConfig(), None)
    for step in range(1000):
        recovery.fence()
        if step == 10:
            recovery.note(step, (finding(10, "loss_spike", "warning", onset=10),), skipped=False)
        elif step % 20 == 0 and step > 10:
            recovery.note(step, (finding(step, "non_finite", "critical", signal=keys.GRAD_NORM),), skipped=True)
        else:
            recovery.note(step, (), skipped=False)
        recovery.after_step(step + 1)
    critical = finding(1000, "divergence", "critical", onset=995)
    recovery.note(1000, (critical,), skipped=False)
    result = recovery.rollback(1000, 995, (critical,), 1)
    assert result is not None and result.snapshot.step == 991 and result.onset == 995


def test_a_ring_of_one_snapshot_is_refused_as_it_could_never_roll_back():
    # the ring's only snapshot is the newest: a NaN burst from a snapshot step aborted with "no snapshot from
    # before step 30", an Inf weight left the model non-finite (reviewer V7)
    import pytest

    from keel import RecoveryConfig

    with pytest.raises(ValueError, match=r"RecoveryConfig.keep_in_memory=1; allowed: an int >= 2"):
        RecoveryConfig(keep_in_memory=1)
    assert RecoveryConfig(keep_in_memory=2).keep_in_memory == 2
