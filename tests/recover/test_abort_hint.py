"""An abort after rollbacks on a loss's level names the case of a loss that rises by design (reviewer V4 of session
13: a healthy DQN's TD loss rose back at once after each rollback and the run was aborted with no way out named)."""

from keel._core import Finding
from keel.recover import Escalation, EscalationConfig

HINT = "watch it with detectors=keel.integrations.watch.adversarial_detectors()"


def _f(kind, signal="loss"):
    return Finding(step=0, kind=kind, severity="critical", signal=signal, value=9.0, baseline=1.0)


def _abort(kind, signal="loss"):
    esc = Escalation(EscalationConfig(policy="recover", max_rollbacks=2))
    decisions = [esc.decide(step, [_f(kind, signal)]) for step in (100, 120, 140)]
    assert [d.action for d in decisions] == ["rollback", "rollback", "abort"]
    return decisions[-1].reason


def test_an_abort_on_divergence_says_what_to_do_when_the_loss_rises_by_design():
    reason = _abort("divergence")
    assert reason.startswith("2 rollbacks within 500 steps did not fix it; last trouble: divergence on loss")
    assert reason.endswith("(a DQN's TD loss as its Q-values grow, a GAN's or a policy gradient's), " + HINT)


def test_an_abort_on_broken_weights_does_not():
    assert HINT not in _abort("non_finite", signal="param/norm")
