"""A trainer's run length after keel's rollbacks (the Hugging Face and Lightning callbacks).

A rollback restores the LR scheduler with the model — the snapshot's step — while the trainer's own step count goes
on. A trainer that stops at its planned ``max_steps`` then ends with the schedule short of its end by the updates the
rollback undid: a cosine's or a linear decay's annealing lost, and nobody told (helper H's H9: an HF run's final LR
2.5e-4 where the bare schedule ends at 3e-6). `ScheduleAfterRollbacks` raises the trainer's ``max_steps`` by those
updates (both trainers read it at every step: the HF Trainer's ``DefaultFlowCallback``, Lightning's epoch loop) and
says so on the ``keel`` logger; a run that ends first (its data, its epochs) is told at the end how short its schedule
stopped. The numbers are kept in the run's meta entry (``hf`` or ``lightning``).

A trainer resumed from its own checkpoint recomputes ``max_steps`` from its arguments: the extension is lost with it
(reviewer V's V4: a linear schedule ended at 1.1e-3 instead of 0, 3 updates short). Each adapter keeps
`ScheduleAfterRollbacks.extended_by` in the checkpoint (the HF ``TrainerState``, Lightning's callback state) and gives
it back to `ScheduleAfterRollbacks.resumed` when the resumed run starts.
"""

from __future__ import annotations

from typing import Any, Protocol

from keel._core.decision import Decision
from keel.guard import Guard, console
from keel.guard.summary import plural


class RunLength(Protocol):
    """What the trainer says of its run: its step count (the update being made, during ``Guard.step``) and the step
    it stops at (a positive ``max_steps``; 0 or -1 when epochs bound the run). The HF ``TrainerState`` is one."""

    @property
    def global_step(self) -> int: ...

    @property
    def max_steps(self) -> int: ...

    @max_steps.setter
    def max_steps(self, steps: int) -> None: ...


class ScheduleAfterRollbacks:
    """Keeps a trainer's run long enough for its LR schedule after keel's rollbacks, and says what it did.

    Args:
        guard: The run's `Guard` (its store and console).
        run: The trainer's `RunLength`.
        extend: Raise ``run.max_steps`` by the updates each rollback undid; ``False``: keep it, and say how short the
            schedule will end.
        meta_key: The run's meta entry for the numbers (``"hf"``, ``"lightning"``).
    """

    def __init__(self, guard: Guard, run: RunLength, *, extend: bool, meta_key: str) -> None:
        self.guard, self.run, self.extend, self.meta_key = guard, run, extend, meta_key
        self.planned = run.max_steps
        self.undone = 0  # updates undone by rollbacks so far
        self.extended_by = 0  # what ``max_steps`` was raised by, before a resume included: what a checkpoint keeps
        self.rollbacks: list[dict[str, int]] = []

    def rolled_back(self, decision: Decision) -> None:
        """After ``decision``'s rollback, made during the trainer's step ``run.global_step``: every update since the
        snapshot's step, this one's included, is undone."""
        if decision.restored_step is None:
            return
        undone = self.run.global_step + 1 - decision.restored_step
        self.undone += undone
        self.rollbacks.append({"step": decision.step, "undone": undone})
        said = f"step {decision.step}: the rollback undid {plural(undone, 'update', count=True)}: "
        short = f"its LR schedule then {plural(self.undone, 'step', count=True)} short of its end"
        if self.planned <= 0:
            said += f"the run is bounded by its epochs, not max_steps: {short} (set max_steps to let keel extend it)"
        elif self.extend:
            before = self.run.max_steps
            self.run.max_steps = before + undone
            self.extended_by += undone
            said += (
                f"the Trainer's max_steps {before} → {self.run.max_steps}, so the run still makes its planned "
                "updates and its LR schedule reaches its end"
            )
        else:
            said += f"the Trainer still stops at max_steps {self.planned}, {short} (extend_after_rollback=False)"
        say(self.guard, said)
        self.guard.recorder.meta({self.meta_key: self._meta()})

    def resumed(self, extended_by: int) -> None:
        """At a resume from the trainer's checkpoint (``run.global_step`` > 0): raise ``max_steps`` again by what
        rollbacks before the checkpoint extended it (the trainer recomputed it from its arguments), and say so."""
        if not (isinstance(extended_by, int) and extended_by > 0 and self.extend and self.planned > 0):
            return
        before = self.run.max_steps
        self.run.max_steps = before + extended_by
        self.undone += extended_by
        self.extended_by += extended_by
        say(
            self.guard,
            f"resumed at step {self.run.global_step} from a checkpoint of a run that rollbacks had extended by "
            f"{plural(extended_by, 'update', count=True)}: the Trainer's max_steps {before} → {self.run.max_steps} "
            "again, so its LR schedule reaches its end",
        )
        self.guard.recorder.meta({self.meta_key: self._meta()})

    def at_the_end(self, stopped: bool = False) -> None:
        """When training ends: say it if the run ended before its extended ``max_steps`` — ``stopped``: the loop or a
        callback asked for it (early stopping, a time budget); otherwise its data or its epochs ran out first."""
        if not (self.extend and self.undone and self.planned > 0):
            return
        short = self.run.max_steps - self.run.global_step
        if short <= 0:
            return
        extended = (
            f"extended after {plural(len(self.rollbacks), 'rollback', count=True)}"
            if self.rollbacks
            else "extended after rollbacks before the checkpoint it resumed from"
        )
        if stopped:
            say(
                self.guard,
                f"training was stopped at step {self.run.global_step} (the loop or a callback asked for it), before "
                f"max_steps {self.run.max_steps} ({extended}): the LR schedule is {plural(short, 'step', count=True)} "
                "short of its end; a resume from a checkpoint saved after the rollback extends max_steps again",
            )
        else:
            say(
                self.guard,
                f"the Trainer stopped at step {self.run.global_step}, before max_steps {self.run.max_steps} (its data "
                f"or its epochs ran out; {extended}): the LR schedule ended {plural(short, 'step', count=True)} short "
                "of its end. Set max_steps with data to spare (or more epochs) to let it finish",
            )

    def _meta(self) -> dict[str, Any]:
        return {
            "extend_after_rollback": self.extend,
            "max_steps": {"planned": self.planned, "now": self.run.max_steps},
            "rollbacks": self.rollbacks,
        }


def say(guard: Guard, text: str) -> None:
    """One warning line on the ``keel`` logger, where the run's console says its own (rank 0 only, not inside
    `keel.guard.console.silenced`)."""
    if not guard.recorder.console.quiet:
        console.ensure_handler()
        console.logger.warning(text)
