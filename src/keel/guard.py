"""Guard: the one object a training loop talks to. Orders signals → detect → recover each step.

    guard = keel.Guard(model, optimizer, scheduler=scheduler, run_dir="runs/exp1", policy="skip")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        decision = guard.step(loss)   # measure → decide → optimizer.step()/scheduler.step() or skip
        optimizer.zero_grad(set_to_none=True)
    guard.close()

The declared order inside `Guard.step`: unscale (GradScaler) → measure (probes, one host copy) → detect →
decide → clip → optimizer.step / scheduler.step (or skip) → after-step probes → store.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.decision import Decision
from keel._core.errors import TrainingAborted
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel.detect import Detector, default_detectors
from keel.environment import describe_environment
from keel.recover.escalation import Escalation, EscalationConfig, Policy
from keel.signals import DEFAULT_PROBES, FULL_PROBES, Measurements, Probe, StepContext, create_probe, pack, unpack
from keel.store import RunWriter

PROBE_SETS = {"default": DEFAULT_PROBES, "full": FULL_PROBES}


class Guard:
    """Watches a training loop and applies (or skips) each optimizer step.

    `Guard.step` calls ``optimizer.step()`` (through the GradScaler when one is given) and
    ``scheduler.step()`` itself unless it decides to skip. With ``policy="observe"`` training is
    bit-identical to the bare loop. An error inside keel is recorded as a ``keel_error`` finding and never
    stops training; a decision that changes training is always recorded with its reason.

    Args:
        model: The model being trained; its trainable parameters are the ones watched.
        optimizer: The optimizer to step.
        scheduler: An LR scheduler stepped after each applied update (not after skipped ones, except under
            ``observe``, which steps exactly like the bare loop).
        run_dir: Directory of the run store (``run_dir/run.sqlite``); ``None`` keeps findings in memory only.
        policy: ``"observe"`` never changes training; ``"skip"`` skips harmful updates; ``"recover"`` may
            also roll back (needs snapshots).
        scaler: A ``torch.amp.GradScaler`` the loop uses; pass ``scaler.scale(loss).backward()`` in the loop
            and the unscaled ``loss`` to `step`.
        log_every: Cadence of the per-parameter signals (parameter norms, update ratios, per-tensor norms).
        probes: ``"default"`` (loss, gradient norm, parameter norm), ``"full"`` (adds update/parameter
            ratios) or a list of probe names or `Probe` objects.
        detectors: Detector objects; default: loss and gradient spikes, divergence, non-finite.
        max_grad_norm: Clip the global gradient norm to this value before the step (as
            ``clip_grad_norm_``), reusing the norm already measured; ``None`` does not clip.
        max_consecutive_skips: Skips in a row before the run aborts.
        config: The run's own configuration, stored with the run (JSON-able).
        seed: The run's seed, stored with the run.

    Raises:
        ValueError: An unknown policy or probe, a model without trainable parameters, a bad cadence.

    Example:
        >>> model = nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Guard(model, opt, policy="skip") as guard:
        ...     loss = model(torch.ones(2, 4)).pow(2).mean()
        ...     loss.backward()
        ...     guard.step(loss).action
        'ok'
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        *,
        run_dir: str | None = None,
        policy: Policy = "observe",
        scaler: torch.amp.GradScaler | None = None,
        log_every: int = 50,
        probes: str | Sequence[str | Probe] = "default",
        detectors: Sequence[Detector] | None = None,
        max_grad_norm: float | None = None,
        max_consecutive_skips: int = 5,
        config: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.escalation = Escalation(EscalationConfig(policy=policy, max_consecutive_skips=max_consecutive_skips))
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__}; allowed: a torch.nn.Module")
        if not hasattr(optimizer, "step") or not hasattr(optimizer, "param_groups"):
            raise ValueError(f"optimizer={type(optimizer).__name__}; allowed: a torch.optim.Optimizer")
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            n_all = sum(1 for _ in model.parameters())
            raise ValueError(f"model {type(model).__name__} has {n_all} parameters, none trainable; "
                             "allowed: a model with at least one parameter with requires_grad=True")
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every={log_every!r}; allowed: an int >= 1")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}; allowed: a number > 0 or None")
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.policy = policy
        self.log_every = log_every
        self.max_grad_norm = max_grad_norm
        self.probes = _build_probes(probes)
        self.detectors = list(detectors) if detectors is not None else default_detectors()
        for probe in self.probes:
            attach = getattr(probe, "attach", None)
            if attach is not None:
                attach(model)
        self.global_step = 0
        self.findings: list[Finding] = []  # every finding of the run, also in the store
        self.decisions: list[Decision] = []  # every decision that was not a plain "ok"
        self._late: Measurements = {}  # after-step measurements of the previous step, sent with this one
        self._late_step = -1
        self._disabled: set[str] = set()
        self._last_call: float | None = None
        self._last_values: dict[str, float] = {}  # host values of the latest step (clipping reads the norm)
        self._closed = False
        self.writer = RunWriter(run_dir) if run_dir is not None else None
        if self.writer is not None:
            meta = describe_environment()
            meta.update(policy=policy, seed=seed, config=config or {}, status="running",
                        model={"class": type(model).__name__, "parameters": sum(p.numel() for _, p in self.named)},
                        optimizer={"class": type(optimizer).__name__, "groups": len(optimizer.param_groups)},
                        probes=[p.name for p in self.probes], detectors=[d.name for d in self.detectors])
            self.writer.set_meta(meta)

    # ------------------------------------------------------------------------------------------------
    def step(self, loss: Tensor | float) -> Decision:
        """Measure this step, decide, then apply the update (or skip it). Call after ``backward()``.

        Args:
            loss: The step's loss (a scalar tensor or float); with gradient accumulation, the loss of the
                whole step (e.g. the mean over micro-batches), called once on the accumulation boundary.

        Returns:
            The `Decision` taken.

        Raises:
            ValueError: ``loss`` is not a scalar.
            TrainingAborted: The escalation ladder ended in ``abort`` (the store is flushed first).
        """
        loss_t = _as_scalar(loss)
        step = self.global_step
        now = time.perf_counter()
        step_time, self._last_call = (now - self._last_call if self._last_call is not None else math.nan), now
        ctx: StepContext | None = None
        try:
            self._unscale()
            ctx = self._context(step, loss_t)
            obs = self._observe(ctx, step_time)
            decision = self.escalation.decide(step, self._detect(obs))
            self._record(obs, decision)
        except Exception as exc:  # keel must never stop training: record, then step as the bare loop would
            decision = Decision(step=step, action="ok")
            self._error("guard", step, exc)
        self._apply(decision)
        if decision.stepped and ctx is not None:
            self._after_step(ctx)
        self.global_step += 1
        if decision.action == "abort":
            self._finish("aborted")
            raise TrainingAborted(f"keel aborted the run at step {step}: {decision.reason}", decision)
        return decision

    def close(self) -> None:
        """Send the last measurements and flush the run store. Safe to call twice."""
        self._finish("finished")

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._finish("finished" if exc_type is None else "aborted" if exc_type is TrainingAborted
                     else f"failed: {exc_type.__name__}: {exc}")

    # --- measure ------------------------------------------------------------------------------------
    def _unscale(self) -> None:
        if self.scaler is None or not self.scaler.is_enabled():
            return
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as exc:  # the loop unscaled already (to clip itself): nothing to do
            if "unscale_() has already been called" not in str(exc):
                raise

    def _context(self, step: int, loss: Tensor) -> StepContext:
        with_grad = [(n, p) for n, p in self.named if p.grad is not None]
        return StepContext(step=step, loss=loss, model=self.model, optimizer=self.optimizer,
                           names=tuple(n for n, _ in with_grad), params=[p for _, p in with_grad],
                           grads=[p.grad for _, p in with_grad], log_step=step % self.log_every == 0)

    def _observe(self, ctx: StepContext, step_time: float) -> Observation:
        measured: Measurements = {}
        for probe in self.probes:
            if probe.name not in self._disabled:
                try:
                    measured.update(probe.measure(ctx))
                except Exception as exc:
                    self._error(probe.name, ctx.step, exc)
        if self.scaler is not None and self.scaler.is_enabled() and self.scaler._scale is not None:
            measured[keys.AMP_SCALE] = self.scaler._scale  # a tensor: read in the same copy, no extra sync
        (values, per_param), (late_values, late_per_param) = unpack(pack(measured, self._late))
        if self._late:
            self._record_late(late_values, late_per_param)
            self._late = {}
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        values[keys.LR] = lrs[0]
        values.update({f"{keys.LR}/{i}": lr for i, lr in enumerate(lrs[1:], 1) if lr != lrs[0]})
        if math.isfinite(step_time):
            values[keys.STEP_TIME] = step_time
        return Observation(step=ctx.step, values=values, per_param=per_param)

    def _detect(self, obs: Observation) -> list[Finding]:
        found: list[Finding] = []
        for detector in self.detectors:
            label = f"detector:{detector.name}"
            if label not in self._disabled:
                try:
                    found.extend(detector.update(obs))
                except Exception as exc:
                    self._error(label, obs.step, exc)
        return found

    # --- act -----------------------------------------------------------------------------------------
    def _apply(self, decision: Decision) -> None:
        """Step, or skip. The user's optimizer and scheduler errors propagate: they are not keel's."""
        scaled = self.scaler is not None and self.scaler.is_enabled()
        if decision.stepped or decision.by == "scaler":  # on overflow the scaler skips the update itself
            if decision.stepped and self.max_grad_norm is not None:
                self._clip()
            if scaled:
                self.scaler.step(self.optimizer)  # type: ignore[union-attr]  (skips by itself on overflow)
                self.scaler.update()  # type: ignore[union-attr]
            else:
                self.optimizer.step()
            if self.scheduler is not None and (decision.stepped or self.policy == "observe"):
                self.scheduler.step()
        elif scaled:
            self.scaler.update()  # type: ignore[union-attr]  (required before the next unscale_)

    def _clip(self) -> None:
        norm = self._last_values.get(keys.GRAD_NORM, math.nan)
        if math.isfinite(norm) and norm > self.max_grad_norm:  # type: ignore[operator]
            grads = [p.grad for _, p in self.named if p.grad is not None]
            torch._foreach_mul_(grads, self.max_grad_norm / (norm + 1e-6))  # type: ignore[operator]

    def _after_step(self, ctx: StepContext) -> None:
        for probe in self.probes:
            if probe.name not in self._disabled:
                try:
                    self._late.update(probe.after_step(ctx))
                except Exception as exc:
                    self._error(probe.name, ctx.step, exc)
        self._late_step = ctx.step

    # --- record --------------------------------------------------------------------------------------
    def _record(self, obs: Observation, decision: Decision) -> None:
        self._last_values = obs.values
        self.findings.extend(decision.findings)
        if decision.action != "ok":
            self.decisions.append(decision)
        if self.writer is None:
            return
        values = dict(obs.values)
        if obs.step % self.log_every == 0 or any(f.kind == "non_finite" for f in decision.findings):
            for family in obs.per_param:
                values.update(obs.expand(family))
        self.writer.add_signals(obs.step, values)
        self.writer.add_findings(decision.findings)
        if decision.action != "ok":
            self.writer.add_decision(decision)

    def _record_late(self, values: dict[str, float], per_param: dict[str, tuple[tuple[str, ...], list[float]]]) -> None:
        if self.writer is None:
            return
        late = Observation(step=self._late_step, values=values, per_param=per_param)
        for family in per_param:
            values.update(late.expand(family))
        self.writer.add_signals(self._late_step, values)

    def _error(self, component: str, step: int, exc: Exception) -> None:
        """Record an error inside keel as a finding and stop using the component that raised it."""
        self._disabled.add(component)
        finding = Finding(
            step=step, kind="keel_error", severity="warning", signal=component,
            evidence={"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)},
            cause=f"keel's {component} raised {type(exc).__name__}: {exc}. It is disabled for the rest of the run.",
            remedy="Training continues without it. Please report this as a keel bug with the traceback.")
        self.findings.append(finding)
        if self.writer is not None:
            self.writer.add_findings([finding])

    def _finish(self, status: str) -> None:
        if self._closed:
            return
        self._closed = True
        for probe in self.probes:
            detach = getattr(probe, "detach", None)
            if detach is not None:
                try:
                    detach()
                except Exception as exc:
                    self._error(probe.name, self.global_step, exc)
        if self._late:
            try:
                self._record_late(*unpack(pack(self._late))[0])
            except Exception as exc:
                self._error("after_step", self._late_step, exc)
            self._late = {}
        if self.writer is not None:
            self.writer.set_meta({"status": status, "steps": self.global_step,
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.writer.close()


def _as_scalar(loss: Tensor | float) -> Tensor:
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.tensor(float(loss))
    if not isinstance(loss, Tensor):
        raise ValueError(f"loss={type(loss).__name__}; allowed: a scalar torch.Tensor or a float")
    if loss.numel() != 1:
        raise ValueError(f"loss has shape {tuple(loss.shape)}; allowed: a scalar (0-d or one-element) tensor "
                         "— reduce it first, e.g. loss.mean()")
    return loss.detach().reshape(())


def _build_probes(probes: str | Sequence[str | Probe]) -> list[Probe]:
    if isinstance(probes, str):
        if probes not in PROBE_SETS:
            raise ValueError(f"probes={probes!r}; allowed: {', '.join(PROBE_SETS)} or a list of probes")
        probes = PROBE_SETS[probes]
    built = [create_probe(p) if isinstance(p, str) else p for p in probes]
    for probe in built:
        if not isinstance(probe, Probe):
            raise ValueError(f"probe {probe!r} lacks name/measure/after_step; allowed: a keel Probe")
    return built
