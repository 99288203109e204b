"""A loss level shift that lasts past its warning is ``critical``; ``policy="recover"`` rolls back to before it, once.

Outside-in: timm's train.py at batch 8 with an LR ×100 for one update (h23 T; the series is keel's store of that run,
`test_early_steps_and_level_shift.TIMM_LOSS`): every step within the run's ±100 % noise, the level 5–9× for 19 steps.
Until now the level shift was a warning nothing acted on, and the run ended at loss 2.6 against 0.42 clean.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel import Guard, RecoveryConfig
from keel._core import Finding, Observation
from keel.detect.spike import SpikeConfig, SpikeDetector
from keel.recover.escalation import Escalation, EscalationConfig, lasting_shift, skippable
from tests.detect.test_early_steps_and_level_shift import TIMM_LOSS


def _update(values, config=None):
    det = SpikeDetector(config or SpikeConfig())
    return [f for step, v in enumerate(values) for f in det.update(Observation(step=step, values={"loss": v}))]


# --- the detector ----------------------------------------------------------------------------------------------------


def test_the_timm_shift_is_critical_five_steps_after_its_warning_dated_before_the_bad_update():
    warning, critical = _update(TIMM_LOSS)
    assert (warning.step, warning.severity, critical.step, critical.severity) == (43, "warning", 48, "critical")
    assert critical.kind == "loss_spike" and critical.evidence["level_shift"] is True
    assert critical.evidence["onset_step"] == warning.evidence["onset_step"] == 33  # the bad update was step 34's
    assert critical.evidence["lasting"] == 5
    assert 4.0 < critical.evidence["ratio"] < 8.0  # against the level before the shift (0.62), not a moving one
    assert "Roll back to a snapshot from before step 33" in critical.advice
    assert "no skipped update mends" in critical.cause
    assert lasting_shift(critical) and not skippable(critical)


def test_a_shift_that_fades_before_it_has_lasted_is_only_the_warning():
    values = list(TIMM_LOSS[:44]) + [0.5, 0.45, 0.6, 0.4, 0.55, 0.5, 0.42, 0.61, 0.47, 0.5]  # back to its level at 44
    assert [(f.step, f.severity) for f in _update(values)] == [(43, "warning")]


def test_shift_lasting_zero_keeps_the_warning_alone():
    assert [f.severity for f in _update(TIMM_LOSS, SpikeConfig(shift_lasting=0))] == ["warning"]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "5", None])
def test_a_bad_shift_lasting_is_one_clear_error(bad):
    with pytest.raises((ValueError, TypeError), match="shift_lasting"):
        SpikeConfig(shift_lasting=bad)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sigma=st.floats(0.2, 0.8), df=st.sampled_from([None, 3.0, 5.0]))
def test_property_iid_heavy_tailed_noise_is_never_a_lasting_shift(seed, sigma, df):
    # measured: 0 criticals in 1.4M steps of iid Gaussian/t noise at ±30–120 % per step, with 4 level-shift warnings
    # (shift_lasting=3 gave 2 criticals there); /tmp/h25A/noise_fp.py
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal(3000) if df is None else rng.standard_t(df, 3000) / math.sqrt(df / (df - 2))
    values = np.exp(sigma * eps)
    found = SpikeDetector(SpikeConfig()).scan(np.arange(3000), values)
    assert [f for f in found if lasting_shift(f)] == []  # (a t₃ tail makes one-step critical spikes: not this test's)


@pytest.mark.xfail(strict=True, reason="h26 G6: a rare level-shift critical on iid t5 noise (about 1 in 6M steps)")
def test_the_known_iid_draw_that_makes_a_lasting_shift():
    # the property above at 2,000 examples drew this: warning at 1318 (the older values' robust scale 0.25 that moment,
    # the process's ~0.4), critical at 1323; pinned so that a fix shows (strict: it passes then)
    df = 5.0
    eps = np.random.default_rng(6698).standard_t(df, 3000) / math.sqrt(df / (df - 2))
    found = SpikeDetector(SpikeConfig()).scan(np.arange(3000), np.exp(0.5 * eps))
    assert [f for f in found if lasting_shift(f)] == []


@pytest.mark.xfail(strict=True, reason="h27: the property above drew a second rare lasting-shift critical (iid t5)")
def test_a_second_known_iid_draw_that_makes_a_lasting_shift():
    # session 15's local runs of the property (not derandomized) drew this (critical at step 674); the class of h26 G6
    rng = np.random.default_rng(91523)
    eps = rng.standard_t(5.0, 3000) / math.sqrt(5.0 / 3.0)
    found = SpikeDetector(SpikeConfig()).scan(np.arange(3000), np.exp(0.5 * eps))
    assert [f for f in found if lasting_shift(f)] == []


def test_scan_and_a_state_round_trip_mid_shift_give_the_same_critical():
    det = SpikeDetector(SpikeConfig())
    before = [f for s, v in enumerate(TIMM_LOSS[:45]) for f in det.update(Observation(step=s, values={"loss": v}))]
    again = SpikeDetector(SpikeConfig())
    again.load_state_dict(det.state_dict())
    rest = [f for s, v in enumerate(TIMM_LOSS[45:], 45) for f in again.update(Observation(step=s, values={"loss": v}))]
    assert [(f.step, f.severity) for f in before + rest] == [(43, "warning"), (48, "critical")]
    assert SpikeDetector(SpikeConfig()).scan(np.arange(len(TIMM_LOSS)), np.array(TIMM_LOSS)) == before + rest


# --- the escalation --------------------------------------------------------------------------------------------------


def _shift(step, onset=33):
    return Finding(
        step=step,
        kind="loss_spike",
        severity="critical",
        signal="loss",
        value=3.0,
        baseline=0.62,
        evidence={"level_shift": True, "onset_step": onset, "lasting": 5},
        cause="The median loss ...",
        advice="Roll back ...",
    )


def test_recover_rolls_back_a_lasting_shift_to_its_onset_and_skip_does_not_skip_it():
    decision = Escalation(EscalationConfig(policy="recover")).decide(48, [_shift(48)])
    assert (decision.action, decision.onset) == ("rollback", 33)
    assert Escalation(EscalationConfig(policy="skip")).decide(48, [_shift(48)]).action == "ok"  # a skip mends nothing
    assert Escalation(EscalationConfig(policy="observe")).decide(48, [_shift(48)]).action == "ok"


def test_a_shift_that_comes_back_after_its_rollback_is_the_data_a_warning_and_no_second_rollback():
    esc = Escalation(EscalationConfig(policy="recover", rollback_window=500))
    assert esc.decide(48, [_shift(48)]).action == "rollback"
    again = esc.decide(70, [_shift(70, onset=49)])  # the restored weights rose again on the same data
    assert again.action == "ok" and esc.rollback_steps == [48]
    (finding,) = again.findings
    assert finding.severity == "warning" and finding.evidence["came_back_after_rollback"] == 48
    assert "keel does not roll back again" in finding.cause
    restored = Escalation(EscalationConfig(policy="recover", rollback_window=500))
    restored.load_state_dict(esc.state_dict())  # a resume keeps it
    assert restored.decide(90, [_shift(90)]).action == "ok"
    assert esc.decide(48 + 500, [_shift(548, onset=530)]).action == "rollback"  # a new episode, past the window


def test_snapshots_written_before_the_shift_rollback_was_kept_load():
    esc = Escalation(EscalationConfig(policy="recover"))
    state = esc.state_dict()
    del state["shift_rollback"]
    esc.load_state_dict(state)
    assert esc.shift_rollback is None


# --- end to end: a Guard under policy="recover" ----------------------------------------------------------------------


def _noisy_run(*, damage_at=None, new_task_at=None, policy="recover", steps=110):
    """A linear regression on its plateau (target noise 0.5), every batch's loss scaled by ±80 % log-normal noise (a
    small-batch run: one step 9× its median is 3 robust z, never a spike). ``damage_at``: the weights knocked off
    between steps (what one overshooting update leaves; at LR 0.005 they take ~35 steps to heal); ``new_task_at``: the
    targets change for good (a new task: the data raises the loss)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = torch.nn.Linear(8, 1)
    w_old, w_new = torch.randn(8, 1), torch.randn(8, 1)
    with torch.no_grad():
        model.weight.copy_(w_old.T)
        model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.005)
    guard = Guard(model, opt, policy=policy, recovery=RecoveryConfig(snapshot_every=10))
    losses, decisions = [], []
    for step in range(steps):
        if step == damage_at:
            with torch.no_grad():
                model.weight.add_(0.5)
        x = torch.randn(16, 8)
        y = x @ (w_new if new_task_at is not None and step >= new_task_at else w_old) + 0.5 * torch.randn(16, 1)
        opt.zero_grad()
        loss = float(np.exp(0.8 * rng.standard_normal())) * torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        decisions.append(guard.step(loss))
        losses.append(loss.item())
    guard.close()
    return losses, decisions, guard


@pytest.mark.slow  # three Guard runs of 110 steps: ~6 s on a loaded 2-core machine
def test_weights_knocked_off_are_rolled_back_once_and_the_run_ends_where_a_clean_one_does():
    clean, _, _ = _noisy_run()
    bare, _, _ = _noisy_run(damage_at=60, policy="observe")
    losses, decisions, guard = _noisy_run(damage_at=60)
    (rollback,) = [d for d in decisions if d.action != "ok"]  # 73 → 50 when measured (onset 58)
    assert rollback.action == "rollback" and 60 < rollback.step < 80 and rollback.restored_step <= rollback.onset <= 60
    assert decisions[-1].step == 109
    assert guard.recovery.lr_scale(len(decisions)) == 1.0  # the first rollback of its kind: no back-off
    tail = slice(-10, None)
    assert np.mean(losses[tail]) < 1.5 * np.mean(clean[tail]) and np.mean(bare[tail]) > 2.5 * np.mean(clean[tail])


@pytest.mark.slow  # one Guard run of 160 steps: ~3 s on a loaded 2-core machine
def test_a_new_task_that_raises_the_loss_for_good_is_rolled_back_at_most_once_and_the_run_goes_on():
    _, decisions, guard = _noisy_run(new_task_at=50, steps=160)
    (rollback,) = [d for d in decisions if d.action != "ok"]  # 61 → 40 when measured; no second one, no abort
    assert rollback.action == "rollback" and 50 < rollback.step < 70 and rollback.restored_step <= 50
    came_back = [f for d in decisions for f in d.findings if "came_back_after_rollback" in f.evidence]
    assert [(f.severity, f.evidence["came_back_after_rollback"]) for f in came_back] == [("warning", rollback.step)]
    assert rollback.step < came_back[0].step < rollback.step + 30  # the same shift, back with the restored weights
    assert not [f for d in decisions[rollback.step + 1 :] for f in d.findings if f.severity == "critical"]
    assert guard.recovery.lr_scale(len(decisions)) == 1.0
