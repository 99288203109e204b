"""Decision: what the Guard did with one optimizer step, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from keel._core.finding import Finding

Action = Literal["ok", "skip", "rollback", "abort"]
ACTIONS: tuple[Action, ...] = ("ok", "skip", "rollback", "abort")
Actor = Literal["keel", "scaler", "trainer"]


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The outcome of `Guard.step` for one step.

    Attributes:
        step: The step decided on.
        action: ``"ok"`` (optimizer stepped), ``"skip"`` (no update applied), ``"rollback"`` or ``"abort"``.
        reason: Why, in words; empty for ``"ok"``.
        by: ``"keel"`` when keel took the action, ``"scaler"`` when a ``torch.amp.GradScaler`` skipped an
            overflowing step on its own (keel records it but does not count it as its own skip), ``"trainer"``
            when the training code skipped the update itself (read from its log, e.g. OLMo-core's
            ``optim/step skipped``).
        findings: The findings seen at this step.
        onset: For a rollback, the step the trouble began (the snapshot restored is from before it).
        restored_step: For a rollback, the step of the snapshot restored.
    """

    step: int
    action: Action = "ok"
    reason: str = ""
    by: Actor = "keel"
    findings: tuple[Finding, ...] = field(default=())
    onset: int | None = None
    restored_step: int | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Decision.action={self.action!r}; allowed: {', '.join(ACTIONS)}")

    def began(self) -> str:
        """When a rollback's trouble began, in words: an onset after the decision's own step is weights found broken
        right after that step's update (the state the next step would start from).

        Example:
            >>> Decision(step=4, action="rollback", onset=5).began(), Decision(step=9, onset=7).began()
            ('trouble found right after the update of step 4', 'trouble began at step 7')
        """
        if self.onset is not None and self.onset > self.step:
            return f"trouble found right after the update of step {self.step}"
        return f"trouble began at step {self.onset if self.onset is not None else self.step}"

    @property
    def stepped(self) -> bool:
        """True when the optimizer's update was applied at this step."""
        return self.action == "ok"

    @property
    def skipped(self) -> bool:
        return self.action == "skip"
