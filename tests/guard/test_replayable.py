"""Which findings `RecoveryConfig(replay=True)` recomputes: a one-step spike, not a lasting level shift (whose damage
is in the weights: a replay called it transient and skipped the step, and no rollback followed)."""

from keel._core import Finding
from keel.guard.guard import _replayable


def _spike(severity="critical", **evidence):
    return Finding(
        step=9, kind="loss_spike", severity=severity, signal="loss", value=9.0, baseline=1.0, evidence=evidence
    )


def test_a_critical_one_step_spike_is_replayed_and_a_lasting_level_shift_is_not():
    assert _replayable(_spike())
    assert not _replayable(_spike(level_shift=True, lasting=True))
    assert not _replayable(_spike(severity="warning"))
