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
