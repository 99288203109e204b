"""The escalation ladder: findings of one step → the action taken on it.

Rungs, each recorded with its reason:

1. **skip** the update when a critical finding is confined to this step's gradients (non-finite gradients, a
   critical loss or gradient spike);
2. **rollback** (``policy="recover"``) when a critical finding is not — divergence, non-finite parameters,
   any other critical kind — or when skips repeat ``max_consecutive_skips`` times in a row, or sooner, at the
   ``max_spiked_skips``-th skip in a row that was all loss or gradient spikes: a skip leaves the weights as they
   were, so spikes on several batches in a row come from the weights (an update already made, an LR jump), which no
   skip mends (a one-off LR ×100 on a timm ResNet: ten skips, then the rollback, and the run ended worse than without
   keel; at the third, better). Once: spikes that go on with the restored weights are the data (a poisoned stretch
   of batches), and are skipped up to ``max_consecutive_skips`` until an update is applied again. A loss level shift
   that lasts past its warning (`keel.detect.spike`: every step within the run's noise, the level not) rolls back to
   before its onset — once: a lasting shift again within ``rollback_window`` steps of that rollback came back with
   the restored weights, so it is the data (a new task, a curriculum stage, a harder stretch of the corpus) or a
   learning rate too high for it, not the update the rollback undid; it is reported as a ``warning`` saying so and
   the run carries on (rolling back again would replay the same shift until the rollback cap aborted a healthy run);
3. **abort** when skips repeat under ``policy="skip"``, when the parameters are non-finite under ``policy="skip"``
   (no skip mends them), or rollbacks repeat ``max_rollbacks`` times within
   ``rollback_window`` steps (DeepSpeed added such a cap to its loss scaler after endless skip loops, PR #1958).

``observe`` never acts. A GradScaler overflow is the scaler's own skip: recorded with ``by="scaler"`` and
not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from keel._core.decision import Decision
from keel._core.finding import Finding
from keel._core.validate import check_types, require_ints
from keel.detect._finding import SKIPPABLE_KINDS as SKIPPABLE_KINDS  # (its home; keel.recover exports it)
from keel.detect._finding import skip_mends

Policy = Literal["observe", "skip", "recover"]
POLICIES: tuple[Policy, ...] = ("observe", "skip", "recover")

SPIKES = frozenset({"loss_spike", "grad_spike"})


def skippable(finding: Finding) -> bool:
    """Whether skipping this step's update is enough (not when the parameters themselves are non-finite, nor for a
    level shift: each of its steps is within the run's noise, the damage is in the weights)."""
    return skip_mends(finding)


def lasting_shift(finding: Finding) -> bool:
    """Whether ``finding`` is a level shift that lasted past its warning (`keel.detect.spike`'s ``critical`` one)."""
    return finding.severity == "critical" and finding.evidence.get("level_shift") is True


@dataclass(kw_only=True)
class EscalationConfig:
    """Settings of the ladder.

    Attributes:
        policy: ``"observe"`` never acts; ``"skip"`` may skip updates; ``"recover"`` may also roll back.
        max_consecutive_skips: Skips in a row after which the run rolls back (recover) or aborts (skip).
        max_spiked_skips: Skips in a row, each of a loss or gradient spike alone, after which ``recover`` rolls
            back (capped by ``max_consecutive_skips``); non-finite gradients keep to ``max_consecutive_skips``.
        max_rollbacks: Rollbacks within ``rollback_window`` steps after which the run aborts.
        rollback_window: The window, in steps, of that cap.
    """

    policy: Policy = "observe"
    max_consecutive_skips: int = 10
    max_spiked_skips: int = 3
    max_rollbacks: int = 3
    rollback_window: int = 500

    def __post_init__(self) -> None:
        check_types(self)
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}; allowed: {', '.join(POLICIES)}")
        require_ints(self, "max_consecutive_skips", "max_spiked_skips", "max_rollbacks", "rollback_window")


class Escalation:
    """Turns each step's findings into a `Decision`, keeping count of skips and rollbacks."""

    def __init__(self, config: EscalationConfig) -> None:
        self.config = config
        self.consecutive_skips = 0
        self.spiked_skips = 0  # of the consecutive skips, those of loss or gradient spikes alone, in a row
        # Whether spikes in a row may still be blamed on the weights: not again after that rollback until an update
        # is applied — spikes that go on with the restored weights are the data (a poisoned stretch of batches).
        self.weights_suspect = True
        self.skip_run_start = -1
        self.rollback_steps: list[int] = []
        self.shift_rollback: int | None = None  # the step of the last rollback for a lasting level shift

    def decide(self, step: int, findings: Sequence[Finding]) -> Decision:
        found = tuple(findings)
        if any(f.kind == "loss_scale_overflow" for f in found):
            return Decision(
                step=step,
                action="skip",
                by="scaler",
                findings=found,
                reason="GradScaler found non-finite gradients and skipped the update itself",
            )
        recover = self.config.policy == "recover"
        if recover:
            found = self._shifts_came_back(step, found)
        critical = [f for f in found if f.severity == "critical"]
        if self.config.policy == "observe" or not critical:
            self.consecutive_skips = self.spiked_skips = 0
            self.weights_suspect = True
            return Decision(step=step, action="ok", findings=found)
        needs_rollback = [f for f in critical if not skippable(f)]
        if needs_rollback and recover:
            decision = self._rollback(step, found, _describe(needs_rollback), _onset(needs_rollback, step))
            if decision.action == "rollback" and any(map(lasting_shift, needs_rollback)):
                self.shift_rollback = step
            return decision
        if broken := [f for f in needs_rollback if f.kind == "non_finite"]:  # training on would only spread NaN
            return Decision(
                step=step,
                action="abort",
                findings=found,
                reason=f"{_describe(broken)}: a skip cannot mend non-finite parameters and policy='skip' does not "
                "roll back (policy='recover' restores the last finite snapshot)",
            )
        if not [f for f in critical if skippable(f)]:
            return Decision(step=step, action="ok", findings=found)  # nothing a skip can fix
        if self.consecutive_skips == 0:
            self.skip_run_start = step
        self.consecutive_skips += 1
        spikes = {f.kind for f in critical if skippable(f)} <= SPIKES
        self.spiked_skips = self.spiked_skips + 1 if spikes else 0
        why = _describe([f for f in critical if skippable(f)])
        if self.consecutive_skips > self.config.max_consecutive_skips:
            reason = (
                f"{self.consecutive_skips} consecutive steps needed a skip (cap "
                f"{self.config.max_consecutive_skips}): skipping cannot fix this; last: {why}"
            )
            if recover:
                return self._rollback(step, found, reason, self.skip_run_start)
            return Decision(step=step, action="abort", findings=found, reason=reason)
        if recover and self.weights_suspect and self.spiked_skips >= self.config.max_spiked_skips:
            reason = (
                f"{self.spiked_skips} steps in a row spiked with the weights unchanged since the first "
                f"(cap {self.config.max_spiked_skips}): the weights, not a batch; a skip cannot mend them; last: {why}"
            )
            self.weights_suspect = False
            return self._rollback(step, found, reason, self.skip_run_start)
        return Decision(step=step, action="skip", findings=found, reason=f"skipped update: {why}")

    def _shifts_came_back(self, step: int, found: tuple[Finding, ...]) -> tuple[Finding, ...]:
        """``found`` with each lasting level shift turned into a ``warning`` that says so when one was rolled back
        within ``rollback_window`` steps: it came back with the restored weights (see the module docstring)."""
        rolled_back = self.shift_rollback
        if rolled_back is None or step - rolled_back >= self.config.rollback_window:
            return found
        return tuple(_came_back(f, rolled_back) if lasting_shift(f) else f for f in found)

    def rollbacks_in_window(self, step: int) -> int:
        return sum(1 for s in self.rollback_steps if step - s < self.config.rollback_window)

    def _rollback(self, step: int, found: tuple[Finding, ...], why: str, onset: int) -> Decision:
        self.consecutive_skips = self.spiked_skips = 0
        if self.rollbacks_in_window(step) >= self.config.max_rollbacks:
            return Decision(
                step=step,
                action="abort",
                findings=found,
                reason=f"{self.config.max_rollbacks} rollbacks within {self.config.rollback_window} "
                f"steps did not fix it; last trouble: {why}{_rises_by_design(found)}",
            )
        self.rollback_steps.append(step)
        return Decision(step=step, action="rollback", findings=found, onset=onset, reason=why)

    def state_dict(self) -> dict[str, Any]:
        return {
            "consecutive_skips": self.consecutive_skips,
            "spiked_skips": self.spiked_skips,
            "weights_suspect": self.weights_suspect,
            "skip_run_start": self.skip_run_start,
            "rollback_steps": list(self.rollback_steps),
            "shift_rollback": self.shift_rollback,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive_skips = int(state["consecutive_skips"])
        self.spiked_skips = int(state.get("spiked_skips", 0))  # snapshots written before it was counted
        self.weights_suspect = bool(state.get("weights_suspect", True))
        self.skip_run_start = int(state["skip_run_start"])
        self.rollback_steps = list(state["rollback_steps"])
        shift_rollback = state.get("shift_rollback")  # (snapshots written before it was kept: None)
        self.shift_rollback = None if shift_rollback is None else int(shift_rollback)


def _came_back(finding: Finding, rolled_back: int) -> Finding:
    """A lasting level shift seen again after the rollback at step ``rolled_back``: a ``warning`` that says why keel
    does not roll back again."""
    return replace(
        finding,
        severity="warning",
        evidence={**finding.evidence, "came_back_after_rollback": rolled_back},
        cause=f"{finding.cause} It came back after the rollback at step {rolled_back} for the same kind of shift: the "
        "restored weights, trained on, rose again, so the data (a new task or curriculum stage) or a learning rate too "
        "high for it raised the level, not the update that rollback undid; keel does not roll back again.",
        advice="If the new data explains the level, nothing to do. Otherwise lower the learning rate or lengthen "
        "warm-up.",
    )


def _describe(findings: list[Finding]) -> str:
    return "; ".join(f"{f.kind} on {f.signal} ({_values(f)})" for f in findings)


def _values(finding: Finding) -> str:
    """``value V, baseline B``; the baseline left out while there is none (a NaN in a run's first steps)."""
    value = f"value {finding.value:.4g}"
    return value if math.isnan(finding.baseline) else f"{value}, baseline {finding.baseline:.4g}"


def _onset(findings: list[Finding], step: int) -> int:
    """When the trouble began: the earliest ``onset_step`` the detectors give, else this step."""
    onsets = [int(f.evidence["onset_step"]) for f in findings if "onset_step" in f.evidence]
    return min(onsets, default=step)


def _rises_by_design(found: tuple[Finding, ...]) -> str:
    """For an abort on a loss's level that rollbacks and lower LRs did not bring down: the loss may rise by design.
    (A DQN's TD loss rose back at once after each rollback with the LR ×0.1, ×0.01, ×0.001: reviewer V4.)"""
    if not any(f.severity == "critical" and f.kind == "divergence" for f in found):
        return ""
    return (
        ". If this loss rises by design while training works (a DQN's TD loss as its Q-values grow, a GAN's or a "
        "policy gradient's), watch it with detectors=keel.integrations.watch.adversarial_detectors()"
    )
