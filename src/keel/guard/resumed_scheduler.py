"""After a resume, the loop's scheduler calls before the first update are held back.

When the loop steps its scheduler itself (``Guard(steps_scheduler=False)``, `keel.watch`), a snapshot's scheduler
state is taken at keel's next call after the update it follows (`keel.recover.recovery.Recovery.complete_snapshot`):
it holds every call the loop made in between — the end of an epoch, and also the top of the next epoch or iteration
for a loop that steps its scheduler there. A resumed loop runs that stretch again from its start (the top of the
epoch or iteration it resumes in), so the calls it makes before its first update are already in the state it
resumed from: made again, a top-of-epoch ``StepLR`` would halve the LR an epoch early. They are withheld, and
counted in the run's meta (``scheduler_calls_held_on_resume``).
"""

from __future__ import annotations

from typing import Any

from keel.guard.optimizers import Schedulers


class HeldScheduler:
    """Withhold the ``step()`` calls of ``scheduler`` (each part of a `keel.Schedulers`) until `release`."""

    def __init__(self, scheduler: Any) -> None:
        parts = scheduler.schedulers if isinstance(scheduler, Schedulers) else (scheduler,)
        self.held = 0
        self._holding = True
        self._gates: list[tuple[Any, Any]] = []
        for part in parts:
            gate = self._gate(part.step)
            part.step = gate
            self._gates.append((part, gate))

    def _gate(self, original: Any) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            if self._holding:
                self.held += 1
                return None
            return original(*args, **kwargs)

        return step

    @property
    def holding(self) -> bool:
        return self._holding

    def release(self) -> int:
        """Let calls through from now on, the schedulers' own ``step`` back in place; returns how many were held.
        (Left in a scheduler's ``__dict__``, which torch's ``state_dict`` returns, the gate made every disk snapshot
        after a resume fail: "cannot store function at /p/scheduler/step".)"""
        self.close()
        return self.held

    def close(self) -> None:
        """Put each scheduler's own ``step`` back (unless something wrapped it since: then the gate passes through)."""
        self._holding = False
        for part, gate in self._gates:
            if part.__dict__.get("step") is gate:
                del part.step
