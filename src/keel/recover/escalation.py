"""The escalation ladder: findings of one step → the action taken on it.

Rungs, each recorded with its reason: **skip** the update (non-finite gradients, a critical single-step
spike) → **abort** when skips repeat ``max_consecutive_skips`` times in a row (DeepSpeed added the same
cap to its loss scaler after endless skip loops, PR #1958). ``observe`` never acts. A GradScaler overflow is
the scaler's own skip: recorded with ``by="scaler"`` and not counted against the cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from keel._core.decision import Decision
from keel._core.finding import Finding

Policy = Literal["observe", "skip", "recover"]
POLICIES: tuple[Policy, ...] = ("observe", "skip", "recover")

# Findings a skipped update fixes: the damage is confined to this step's gradients.
SKIPPABLE_KINDS = frozenset({"non_finite", "loss_spike", "grad_spike"})


@dataclass(kw_only=True)
class EscalationConfig:
    """Settings of the ladder.

    Attributes:
        policy: ``"observe"`` never acts; ``"skip"`` may skip updates; ``"recover"`` may also roll back.
        max_consecutive_skips: Skips in a row after which the run aborts instead.
    """

    policy: Policy = "observe"
    max_consecutive_skips: int = 5

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}; allowed: {', '.join(POLICIES)}")
        if not isinstance(self.max_consecutive_skips, int) or self.max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={self.max_consecutive_skips!r}; allowed: an int >= 1")


class Escalation:
    """Turns each step's findings into a `Decision`, keeping count of consecutive skips."""

    def __init__(self, config: EscalationConfig) -> None:
        self.config = config
        self.consecutive_skips = 0

    def decide(self, step: int, findings: Sequence[Finding]) -> Decision:
        found = tuple(findings)
        if any(f.kind == "loss_scale_overflow" for f in found):
            return Decision(step=step, action="skip", by="scaler", findings=found,
                            reason="GradScaler found non-finite gradients and skipped the update itself")
        critical = [f for f in found if f.severity == "critical" and f.kind in SKIPPABLE_KINDS]
        if self.config.policy == "observe" or not critical:
            self.consecutive_skips = 0
            return Decision(step=step, action="ok", findings=found)
        self.consecutive_skips += 1
        why = "; ".join(f"{f.kind} on {f.signal} (value {f.value:.4g}, baseline {f.baseline:.4g})" for f in critical)
        if self.consecutive_skips > self.config.max_consecutive_skips:
            return Decision(step=step, action="abort", findings=found,
                            reason=f"{self.consecutive_skips} consecutive steps needed a skip "
                                   f"(cap {self.config.max_consecutive_skips}): skipping cannot fix this; "
                                   f"last: {why}")
        return Decision(step=step, action="skip", findings=found, reason=f"skipped update: {why}")

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive_skips = int(state["consecutive_skips"])
