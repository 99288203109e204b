import pytest

from keel._core import Finding
from keel.recover import Escalation, EscalationConfig


def _f(kind, severity="critical", signal="loss", onset=None):
    evidence = {"onset_step": onset} if onset is not None else {}
    return Finding(step=0, kind=kind, severity=severity, signal=signal, value=9.0, baseline=1.0, evidence=evidence)


def test_observe_never_acts():
    esc = Escalation(EscalationConfig(policy="observe"))
    assert esc.decide(3, [_f("non_finite"), _f("divergence")]).action == "ok"


def test_skip_then_abort_under_skip():
    esc = Escalation(EscalationConfig(policy="skip", max_consecutive_skips=2))
    actions = [esc.decide(s, [_f("loss_spike")]).action for s in range(3)]
    assert actions == ["skip", "skip", "abort"]


def test_ok_step_resets_the_skip_count():
    esc = Escalation(EscalationConfig(policy="skip", max_consecutive_skips=2))
    esc.decide(0, [_f("loss_spike")])
    esc.decide(1, [])
    assert [esc.decide(s, [_f("loss_spike")]).action for s in (2, 3)] == ["skip", "skip"]


def test_divergence_rolls_back_under_recover_and_is_only_recorded_under_skip():
    assert Escalation(EscalationConfig(policy="skip")).decide(5, [_f("divergence")]).action == "ok"
    d = Escalation(EscalationConfig(policy="recover")).decide(50, [_f("divergence", onset=41)])
    assert (d.action, d.onset) == ("rollback", 41)


def test_non_finite_parameters_need_a_rollback_not_a_skip():
    d = Escalation(EscalationConfig(policy="recover")).decide(7, [_f("non_finite", signal="param/norm")])
    assert d.action == "rollback"


def test_non_finite_parameters_abort_under_skip_at_once_rather_than_train_on_nan():
    d = Escalation(EscalationConfig(policy="skip")).decide(7, [_f("non_finite", signal="param/norm")])
    assert d.action == "abort" and "policy='recover'" in d.reason


def test_skip_cap_rolls_back_to_the_start_of_the_run_of_skips_under_recover():
    esc = Escalation(EscalationConfig(policy="recover", max_consecutive_skips=2))
    actions = [esc.decide(s, [_f("loss_spike")]) for s in range(10, 13)]
    assert [d.action for d in actions] == ["skip", "skip", "rollback"]
    assert actions[-1].onset == 10


def test_rollback_cap_aborts():
    esc = Escalation(EscalationConfig(policy="recover", max_rollbacks=2, rollback_window=100))
    actions = [esc.decide(s, [_f("divergence")]).action for s in (10, 20, 30)]
    assert actions == ["rollback", "rollback", "abort"]
    assert esc.decide(200, [_f("divergence")]).action == "rollback"  # outside the window again


def test_scaler_overflow_is_the_scalers_skip():
    d = Escalation(EscalationConfig(policy="skip")).decide(1, [_f("loss_scale_overflow", severity="info")])
    assert (d.action, d.by) == ("skip", "scaler")


def test_warnings_do_not_act():
    assert Escalation(EscalationConfig(policy="recover")).decide(1, [_f("divergence", "warning")]).action == "ok"


@pytest.mark.parametrize("field", ["max_consecutive_skips", "max_rollbacks", "rollback_window"])
def test_bad_config(field):
    with pytest.raises(ValueError, match=f"{field}=0; allowed"):
        EscalationConfig(**{field: 0})


def test_state_round_trip():
    esc = Escalation(EscalationConfig(policy="recover"))
    esc.decide(3, [_f("loss_spike")])
    esc.decide(9, [_f("divergence")])
    other = Escalation(EscalationConfig(policy="recover"))
    other.load_state_dict(esc.state_dict())
    assert other.state_dict() == esc.state_dict()


def test_spikes_on_several_batches_in_a_row_roll_back_at_the_third_skip_under_recover():
    # a skip leaves the weights as they were: spikes on three batches in a row come from the weights (a one-off LR
    # x100 on a timm ResNet was skipped ten times, then rolled back, and ended worse than without keel; helper T)
    esc = Escalation(EscalationConfig(policy="recover"))
    decisions = [esc.decide(s, [_f("loss_spike" if s % 2 else "grad_spike")]) for s in range(40, 43)]
    assert [d.action for d in decisions] == ["skip", "skip", "rollback"]
    assert decisions[-1].onset == 40 and "the weights, not a batch" in decisions[-1].reason


def test_non_finite_gradients_and_policy_skip_keep_the_consecutive_skip_cap():
    recover = Escalation(EscalationConfig(policy="recover", max_consecutive_skips=5))
    assert [recover.decide(s, [_f("non_finite")]).action for s in range(6)] == ["skip"] * 5 + ["rollback"]
    skip = Escalation(EscalationConfig(policy="skip", max_consecutive_skips=5))
    assert [skip.decide(s, [_f("loss_spike")]).action for s in range(6)] == ["skip"] * 5 + ["abort"]


def test_a_non_finite_skip_or_a_clean_step_restarts_the_count_of_spikes():
    esc = Escalation(EscalationConfig(policy="recover"))
    kinds = ["loss_spike", "loss_spike", "non_finite", "loss_spike", "loss_spike", None, "grad_spike", "grad_spike"]
    actions = [esc.decide(s, [_f(k)] if k else []).action for s, k in enumerate(kinds)]
    assert actions == ["skip", "skip", "skip", "skip", "skip", "ok", "skip", "skip"]
    state = esc.state_dict()
    assert state["spiked_skips"] == 2
    again = Escalation(EscalationConfig(policy="recover"))
    again.load_state_dict(state)
    assert again.decide(8, [_f("grad_spike")]).action == "rollback"


def test_spikes_that_go_on_after_the_weights_rollback_are_the_data_until_an_update_is_applied():
    esc = Escalation(EscalationConfig(policy="recover", max_consecutive_skips=4))
    run = [esc.decide(s, [_f("loss_spike")]).action for s in range(3)]
    assert run == ["skip", "skip", "rollback"]
    # the same spikes with the restored weights: a poisoned stretch of batches, skipped up to the cap
    assert [esc.decide(s, [_f("loss_spike")]).action for s in range(3, 8)] == ["skip"] * 4 + ["rollback"]
    assert esc.decide(8, []).action == "ok"  # an update applied: spikes may be the weights again
    assert [esc.decide(s, [_f("grad_spike")]).action for s in range(9, 12)] == ["skip", "skip", "rollback"]


def test_a_skip_reason_says_no_baseline_when_there_is_none():
    # a NaN in a run's first steps has no baseline yet: the reason read "(value nan, baseline nan)" (helper T)
    nan = Finding(step=0, kind="non_finite", severity="critical", signal="loss", value=float("nan"))
    reason = Escalation(EscalationConfig(policy="skip")).decide(0, [nan]).reason
    assert reason == "skipped update: non_finite on loss (value nan)"
    assert "(value 9, baseline 1)" in Escalation(EscalationConfig(policy="skip")).decide(0, [_f("loss_spike")]).reason
