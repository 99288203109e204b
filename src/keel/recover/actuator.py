"""Actuator: carries out a `Decision` on the live training objects — step, skip or roll back.

The declared order at the optimizer: fence the snapshot in flight → clip → scale the LR (the lr_backoff action) →
``optimizer.step()`` (through the GradScaler when one is used) → restore the LR → ``scheduler.step()``.
A skipped step advances neither the optimizer nor the scheduler (Megatron and the HF Trainer do the same);
under ``observe`` the scheduler steps exactly as in the bare loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from keel._core.decision import Decision
from keel.detect.lr_surge import skipped_for_a_surge
from keel.recover.gate import step_gated
from keel.recover.recovery import Recovery, RecoveryExhausted
from keel.recover.state import TrainingState

CLIP_EPS = 1e-6  # clip_grad_norm_'s: the coefficient is max_norm / (total_norm + 1e-6)


class Actuator:
    """Applies decisions. The user's optimizer and scheduler errors propagate: they are not keel's.

    Args:
        state: The run's model, optimizer, scheduler and scaler.
        observe: True under ``policy="observe"`` (the scheduler then steps as in the bare loop).
        max_grad_norm: Clip the global gradient norm to this before stepping; ``None`` does not clip.
        recovery: Snapshots and actions, under ``policy="recover"`` or when resuming.
    """

    def __init__(
        self, state: TrainingState, *, observe: bool, max_grad_norm: float | None, recovery: Recovery | None
    ) -> None:
        self.state, self.observe, self.max_grad_norm, self.recovery = state, observe, max_grad_norm, recovery
        self.steps_scheduler = True

    @property
    def scaler(self) -> Any | None:
        """The ``GradScaler`` when one is given and enabled, else None."""
        scaler = self.state.scaler
        return scaler if scaler is not None and scaler.is_enabled() else None

    def apply(self, decision: Decision, grad_norm: float, rollbacks_in_window: int = 1) -> Decision:
        """Carry out ``decision``; returns it, completed with what a rollback restored (or turned into an abort).

        Args:
            decision: What to do.
            grad_norm: This step's global gradient norm (for clipping without measuring it again).
            rollbacks_in_window: Rollbacks in the escalation window, this one included (actions escalate).
        """
        if decision.action == "rollback":
            return self._rollback(decision, rollbacks_in_window)
        if decision.stepped or decision.by == "scaler":  # on overflow the scaler skips the update itself
            self._step(decision.step, decision.stepped, grad_norm)
        elif self.scaler is not None:
            self.scaler.update()  # required before the next unscale_()
        # after a skip for an LR surge too: the schedule's next value replaces a surge it made
        self.step_scheduler(decision.stepped or skipped_for_a_surge(decision))
        return decision

    def step_scheduler(self, stepped: bool) -> None:
        """Step the scheduler after an applied update (after every update under ``observe``), unless the loop
        steps it itself (``Guard(steps_scheduler=False)``)."""
        if self.state.scheduler is not None and self.steps_scheduler and (stepped or self.observe):
            self.state.scheduler.step()

    def lr_scales(self, step: int) -> list[float]:
        """Each param group's LR scale (the model's, times a router group's own back-off)."""
        if self.recovery is None:
            return [1.0] * len(self.state.optimizer.param_groups)
        return self.recovery.lr_scales(step)

    def after_step(self, steps_done: int) -> None:
        """Take a snapshot if one is due (the state now is the start of step ``steps_done``)."""
        if self.recovery is not None:
            self.recovery.after_step(steps_done)

    def _step(self, step: int, clip: bool, grad_norm: float) -> None:
        if self.recovery is not None:
            self.recovery.fence()  # the snapshot copy must finish before the tensors change
        limit = self._clip_limit()
        if clip and limit is not None and math.isfinite(grad_norm) and grad_norm > limit:
            self._scale_grads(limit / (grad_norm + CLIP_EPS))
        with self._lr_scaled(step):
            if self.scaler is not None:
                self.scaler.step(self.state.optimizer)
                self.scaler.update()
            else:
                self.state.optimizer.step()

    def step_on_device(self, step: int, verdict: Tensor | None, grad_norm: Tensor | None) -> None:
        """The update of ``Guard(sync="deferred")``: nothing read to the host; skipped in the optimizer's kernel
        where ``verdict`` is 1 (`keel.recover.gate`), clipped with a coefficient computed on the device. The
        scheduler is stepped when the step lands (`keel.guard.deferred`)."""
        if self.recovery is not None:
            self.recovery.fence()
        limit = self._clip_limit()
        if limit is not None and grad_norm is not None:
            coef = torch.clamp(limit / (grad_norm.to(torch.float32) + CLIP_EPS), max=1.0)
            self._scale_grads(torch.where(torch.isfinite(coef), coef, torch.ones_like(coef)))
        with self._lr_scaled(step):
            if verdict is None:
                self.state.optimizer.step()
            else:
                step_gated(self.state.optimizer, verdict)

    @contextlib.contextmanager
    def _lr_scaled(self, step: int) -> Iterator[None]:
        """The optimizer's learning rates times the LR scales of the actions in force, for one step."""
        scales = self.lr_scales(step)
        groups = self.state.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        scaled = any(s != 1.0 for s in scales)
        if scaled:
            for g, scale in zip(groups, scales, strict=True):
                g["lr"] = g["lr"] * scale
        try:
            yield
        finally:
            if scaled:
                for g, lr in zip(groups, saved, strict=True):
                    g["lr"] = lr

    def _scale_grads(self, coef: float | Tensor) -> None:
        grads = [p.grad for p in self.state.model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, coef)

    def _clip_limit(self) -> float | None:
        tightened = self.recovery.actions.max_grad_norm if self.recovery is not None else None
        limits = [x for x in (self.max_grad_norm, tightened) if x is not None]
        return min(limits) if limits else None

    def _rollback(self, decision: Decision, rollbacks_in_window: int) -> Decision:
        if self.scaler is not None:
            self.scaler.update()  # close the scaler's step; its state is restored below
        onset = decision.onset if decision.onset is not None else decision.step
        try:
            result = (
                self.recovery.rollback(decision.step, onset, decision.findings, rollbacks_in_window)
                if self.recovery is not None
                else None
            )
        except RecoveryExhausted as exc:
            return replace(decision, action="abort", reason=f"{decision.reason}; no rollback: {exc}")
        except Exception as exc:  # keel's own failure: never kill the run; leave this update out and go on
            return replace(
                decision,
                action="skip",
                reason=f"rollback failed ({type(exc).__name__}: {exc}); skipped the update instead. "
                f"Trigger: {decision.reason}",
            )
        if result is None:
            return replace(
                decision,
                action="abort",
                reason=f"{decision.reason}; no snapshot from before step {decision.onset} to roll back to",
            )
        actions = ", ".join(result.actions) or "none needed"
        passed = f" ({'; '.join(result.passed_over)})" if result.passed_over else ""  # newer ones it could not use
        onset_from = f": {result.onset_from}" if result.onset_from else ""  # not the critical finding's own onset
        began = replace(decision, onset=result.onset).began()
        return replace(
            decision,
            onset=result.onset,
            restored_step=result.snapshot.step,
            reason=f"rolled back to the snapshot of step {result.snapshot.step}{passed} ({began}{onset_from}); steps "
            f"{result.snapshot.step}–{decision.step} are not replayed; actions: {actions}. Trigger: {decision.reason}",
        )
