"""The loop's own ``scheduler.step()`` under `keel.watch`: the loop keeps its cadence, keel only withholds a step
that belongs to an update keel did not apply.

A loop may step its scheduler after every update (LLM recipes), once per epoch (``StepLR`` in most vision recipes),
with a metric (``ReduceLROnPlateau.step(val_loss)``), or on a no-op call of every micro-batch (accelerate's
``accumulate()``). keel cannot know which before the loop's first call, so it never steps the scheduler itself
(``Guard(steps_scheduler=False)``: its snapshots still hold and restore the scheduler's state) and passes the loop's
calls through, with one exception: a call that follows exactly one update, made without arguments, is that update's
— when keel skipped or rolled back that update the call is withheld, as `keel.Guard.step` does not step the
scheduler for an update it did not apply (Megatron and the HF Trainer do the same). A call after several updates is
an epoch's: it always goes through, and the updates keel did not apply before it are forgiven.

Under ``sync="deferred"`` a skip is known one update late, so the call withheld is the next update's: the LR is one
step ahead of the schedule for that one update, and the count of scheduler steps is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class LoopScheduler:
    """Counts the updates between the loop's ``scheduler.step()`` calls and the ones keel did not apply.

    Args:
        observe: Under ``policy="observe"`` every call goes through (bit-identical to the bare loop).
    """

    def __init__(self, *, observe: bool) -> None:
        self.observe = observe
        self.updates_since_call = 0
        self.not_applied = 0  # updates keel skipped or rolled back whose scheduler step is still to withhold

    def after_update(self, not_applied: int) -> None:
        """One update call of the loop, with the decisions that landed in it which did not apply an update."""
        self.updates_since_call += 1
        if not self.observe:
            self.not_applied += not_applied

    def loop_call(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The loop's ``scheduler.step(...)``: through, unless it is a skipped update's own call."""
        updates, self.updates_since_call = self.updates_since_call, 0
        if updates == 1 and not args and not kwargs and self.not_applied:
            self.not_applied -= 1
            return None
        if updates > 1:
            self.not_applied = 0
        return original(*args, **kwargs)
