"""``Guard(sync="deferred")``: a step that reads nothing to the host before its update.

With ``sync="step"`` each `Guard.step` copies the step's packed signals to the host and decides before the
update: one device→host sync per step, which on a GPU drains the launch queue (the CPU cannot queue the next
forward until the GPU has finished this step). With ``sync="deferred"`` the step

1. lands the *previous* step's signals, whose copy ran while this step's forward and backward were queued
   (`keel.signals.HostCopy`), and decides on them: detectors, escalation, the store — one step late;
2. measures this step on the device, computes the skip verdict there (`keel.recover.gate.DeviceGate`: a
   non-finite loss or gradient norm, a critical loss or gradient-norm spike against limits the detectors set
   one step ahead), queues the signals' copy to the host, and
3. applies the update through the optimizer's ``found_inf``, which skips it inside the kernel.

What lags one step, and why that is safe:

- **Skips do not lag**: exactly the updates ``sync="step"`` skips (the skippable kinds of
  `keel.recover.escalation`) are skipped on the device, at their own step.
- **Rollbacks and aborts** are carried out at the next `Guard.step`, before its update: that step's gradients
  are dropped, one batch more than ``sync="step"`` spends. A rollback restores a snapshot from before the
  trouble's onset, so the extra step never survives it.
- **The scheduler** steps when the step it follows has landed, before the next update: the optimizer sees the
  same learning rates as with ``sync="step"``; between two `Guard.step` calls ``scheduler.get_last_lr()`` is
  one step behind. `close` lands the last step.
- **The returned `Decision`** is the previous step's (``decision.step`` says which); the first call returns a
  placeholder ``ok``.
- **Snapshots** are taken after the update as before; the schedule learns of a step's trouble one step late.
- **Clipping** (``max_grad_norm``, the tighten_clipping action) runs on the device: the same coefficient in float32.

Needs an optimizer that takes ``found_inf`` (PyTorch's Adam, AdamW or SGD with ``fused=True``) unless
``policy="observe"``; not with a GradScaler or under torch.distributed (yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from keel._core import keys
from keel._core.decision import Decision
from keel._core.errors import TrainingAborted
from keel._core.observation import Observation
from keel.recover.gate import DeviceGate, takes_found_inf
from keel.signals import HostCopy, pack

GATE = "keel/gated"  # the device's verdict, sent to the host with the step's signals


@dataclass
class InFlight:
    """What the host keeps of a step whose signals are on their way: its host-side values."""

    step: int
    host: dict[str, float]  # learning rates and step time, as they were when the step was taken
    late_step: int
    copy: HostCopy = field(default_factory=HostCopy)


class DeferredSteps:
    """`Guard`'s ``sync="deferred"`` step (a mixin: it works on the Guard's own state)."""

    def _init_deferred(self) -> None:
        g: Any = self
        if g.dist is not None:
            raise ValueError("sync='deferred' under torch.distributed: not supported yet; allowed: sync='step'")
        gating = g.policy != "observe"
        if gating and not takes_found_inf(g.optimizer):
            raise ValueError(
                f"sync='deferred' with policy={g.policy!r} skips updates through the optimizer's "
                f"found_inf; {type(g.optimizer).__name__} does not take it; allowed: "
                "torch.optim.Adam/AdamW/SGD(..., fused=True), or policy='observe'"
            )
        names = {p.name for p in g.probes}
        if gating and not names & {"loss", "grad_norm"}:
            raise ValueError(
                f"sync='deferred' gates on the loss or the gradient norm; probes={sorted(names)} "
                "has neither; allowed: probe sets with 'loss' or 'grad_norm'"
            )
        self.gate = DeviceGate(g.detectors) if gating else None
        self._in_flight: InFlight | None = None

    def _step_deferred(self, step: int, loss: Tensor, step_time: float) -> Decision:
        g: Any = self
        landed = None
        try:
            landed = self._land()
        except Exception as exc:  # noqa: BLE001 - keel must never stop training
            g.components.fail("guard", step - 1, exc, disable=False)
        if landed is not None and landed[0].action in ("rollback", "abort"):
            return self._act_late(*landed, step)
        verdict, ctx, norm = None, None, None
        try:
            ctx = g._context(step, loss)
            measured = g._measure(ctx)
            norm = measured.get(keys.GRAD_CLIPPED_NORM, measured.get(keys.GRAD_NORM))  # the gradients as they are now
            if self.gate is not None:
                self.gate.set_limits(step)
                verdict = measured[GATE] = self.gate.verdict(measured)
            flight = InFlight(step=step, host=g._host_values(step, step_time), late_step=g._late_step)
            flight.copy.start(pack(measured, g._late))
            g._late = {}
            self._in_flight = flight
        except Exception as exc:  # noqa: BLE001 - record, then step as the bare loop would
            g.components.fail("guard", step, exc, disable=False)
            verdict = None
        g.actuator.step_on_device(step, verdict, norm)
        if ctx is not None:
            g._after_step(ctx)
        g.global_step += 1
        g.components.step = g.global_step
        g.evaluation.after_step(step)  # before the snapshot: a resume from it must not miss this round of evals
        if g.recovery is not None:
            g.components.call("snapshots", g.actuator.after_step, g.global_step)
        return (
            landed[0]
            if landed is not None
            else Decision(step=step, action="ok", reason="deferred: decided when the next step lands")
        )

    def _land(self) -> tuple[Decision, Observation] | None:
        """Decide on the step in flight: its decision and observation (None: there is none). Records it and steps
        the scheduler, except for a rollback or abort, which is recorded once carried out (`_act_late`)."""
        g: Any = self
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return None
        (values, per_param), late = flight.copy.land()
        if late[0] or late[1]:
            g.recorder.late(Observation(step=flight.late_step, values=late[0], per_param=late[1]))
        gated = values.pop(GATE, 0.0) != 0.0
        g._read_parameters_if_non_finite(values, per_param, g._names, g._params)  # as they are: the update was gated
        values.update(flight.host)
        obs = Observation(step=flight.step, values=values, per_param=per_param)
        decision = _as_carried_out(g.escalation.decide(flight.step, g.components.detect(obs)), gated)
        if decision.action in ("rollback", "abort"):
            return decision, obs
        g.actuator.step_scheduler(decision.stepped)
        self._record(obs, decision)
        return decision, obs

    def _record(self, obs: Observation, decision: Decision) -> None:
        g: Any = self
        g.components.call("recorder", g.recorder.step, obs, decision)
        if g.recovery is not None:
            g.recovery.note(obs.step, decision.findings, skipped=not decision.stepped)
            g._record_disk_snapshots()

    def _act_late(self, decision: Decision, obs: Observation, step: int) -> Decision:
        """Carry out a rollback or an abort decided on the step before ``step`` (observed as ``obs``); this step's
        update is dropped."""
        g: Any = self
        if decision.action == "rollback":
            decision = g.actuator.apply(decision, math.nan, g.escalation.rollbacks_in_window(decision.step))
        if decision.action == "rollback" and decision.restored_step is not None:
            g.evaluation.after_rollback(decision.restored_step)
        self._record(obs, decision)
        g.global_step += 1
        g.components.step = g.global_step
        if decision.action == "abort":
            g._finish("aborted")
            raise TrainingAborted(f"keel aborted the run at step {decision.step}: {decision.reason}", decision)
        g.evaluation.after_step(step)
        return decision

    def _close_deferred(self) -> None:
        """Decide on the last step; a rollback or abort it asks for is only recorded (the run is over)."""
        landed = self._land() if self._in_flight is not None else None
        if landed is not None and landed[0].action in ("rollback", "abort"):
            decision, obs = landed
            self._record(obs, replace(decision, reason=f"not carried out: the run was closed. {decision.reason}"))


def _as_carried_out(decision: Decision, gated: bool) -> Decision:
    """The host's decision, reconciled with what the device already did to that step's update."""
    if decision.action == "skip" and not gated:
        return replace(
            decision,
            action="ok",
            reason=f"too late to skip (sync='deferred' skips on the device only "
            f"non-finite values and critical spikes): {decision.reason}",
        )
    if decision.action == "ok" and gated:
        return replace(
            decision,
            action="skip",
            reason="skipped on the device: a non-finite or critical value at the limit the detectors set",
        )
    return decision
