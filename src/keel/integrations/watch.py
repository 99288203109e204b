"""`keel.watch`: a `Guard` on a loop as it is already written — keel hooks the loop's own calls.

    guard = keel.watch(model, optimizer, scaler=scaler, policy="recover", run_dir="out/keel")

and the loop stays as it is: forward, ``loss.backward()`` (or ``scaler.scale(loss).backward()``), its own
``clip_grad_norm_``, ``optimizer.step()`` (or ``scaler.step(optimizer)``; ``scaler.update()``), its own LR
writes and ``zero_grad``. What keel hooks, on the loop's own objects (`Watch.close` puts everything back; it
runs at interpreter exit if the loop never calls it):

- **the update**: ``optimizer.step()`` and ``scaler.step(optimizer)`` go to `Guard.step`, which steps, skips
  or rolls back; ``optimizer.step(closure)`` (Lightning's optimizer wrapper always gives one) first evaluates the
  closure once, as ``torch.optim.SGD`` does, and returns its result. The loop's ``scaler.update()`` that follows
  does nothing: keel did it — the hand-off of the trainer adapters (`keel.integrations._handoff`). Under
  accelerate's ``accumulate()`` the calls between two gradient synchronisations are accelerate's no-ops and pass
  through: one keel step per synchronised update.
- **the scheduler** stays the loop's, stepped where the loop steps it (per update, per epoch, or with a metric
  as ``ReduceLROnPlateau``); only the call that follows an update keel did not apply is withheld
  (`keel.integrations._loop_scheduler`). keel's snapshots hold and restore its state.
- **the loss**, in this order: what the loop gave `Watch.record` for the step; else the loss in the model's
  output while training (``output.loss``, ``output["loss"]``, the one scalar in a returned tuple, as nanoGPT's
  ``logits, loss = model(x, y)``, or a bare scalar the loop calls ``backward()`` on as it is, as modded-nanogpt's
  ``model(x, y).backward()``), the mean over the step's micro-batches; else the scalar tensors the loop called
  ``backward()`` on, summed over the micro-batches and divided by the GradScaler's scale (a loop that divides by
  its accumulation steps before ``backward`` then gives the mean). Forwards in ``model.eval()`` or under
  ``torch.no_grad()`` are not counted.
- **clipping**: the loop's ``torch.nn.utils.clip_grad_norm_`` on the model's parameters clips as before; keel
  keeps the norm it returns — the norm *before* clipping — and detects on it (``Guard.step(grad_norm=)``), so
  clipping does not hide a gradient spike. Clipping in torch's two parts (``get_total_norm``, then
  ``clip_grads_with_norm_(params, max_norm, total_norm)``, as accelerate's ``clip_grad_norm_`` does) keeps
  ``total_norm`` the same way. (A ``clip_grad_norm_`` imported by name before `watch` is not seen;
  keel then measures the clipped gradients.)
- **learning rates** the loop writes into ``param_groups`` are used as written; the lr_backoff action's LR scale
  multiplies them for each update, so it survives the loop's writes.
- **a model EMA** the loop keeps (timm's ``ModelEmaV3``, ``torch.optim.swa_utils.AveragedModel``) is not found by
  keel: register it, ``guard.track(model_ema, name="ema")``, and a rollback restores it with the model, a resume
  continues it (`keel.Guard.track`).

Gradient accumulation needs nothing: micro-batches add up until the loop's update call. Several optimizers (Muon
for the matrices, AdamW for the rest) are given as a list: the earlier ones' ``step()`` calls of an update wait, and
keel decides at the last one's and steps, skips or restores them all there, once the loop has readied each one's
gradients (modded-nanogpt waits for each optimizer's gradient all-reduce just before its ``step()``); a scheduler
call between them is made after that update. A loop with a backward per
optimizer (a GAN: D's backward and step, then G's) takes one watch per model and optimizer, ``keel.watch(netD,
optD)`` and ``keel.watch(netG, optG)``: each backward's loss goes to the first of them to update after it among
those whose model it reached (`keel.integrations._backward_owner`), so a NaN in G's loss skips G's update, not D's.
A GAN's losses rise and fall by design: give both watches ``detectors=adversarial_detectors()`` (no loss spike or
divergence detector; on the dcgan shape the defaults rolled a clean run's generator back); keel warns once otherwise.
An AMP GAN's one GradScaler is given to both watches: the first steps and updates it, the other unscales its losses.
A Lightning Fabric loop (``model, opt = fabric.setup(model, opt)``, ``fabric.backward(loss)``, ``opt.step()``) takes
``keel.watch(model, opt)`` on what ``fabric.setup`` returned: keel hooks the optimizer Fabric wraps, where the update
arrives with the gradients unscaled under ``16-mixed``, and takes Fabric's GradScaler (`keel.guard.fabric`).
"""

from __future__ import annotations

import atexit
import functools
import gc
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from keel._core import keys
from keel._core.caller import loop_stacklevel
from keel._core.decision import Decision
from keel._core.errors import KeelWarning, TrainingAborted
from keel.detect import DivergenceDetector, SpikeDetector, default_detectors
from keel.detect.detector import Detector
from keel.detect.lr_surge import skipped_for_a_surge
from keel.guard import Guard, Optimizers, Schedulers
from keel.guard.fabric import fabric_scaler_of, fabric_wrapped
from keel.integrations._backward_owner import OWNERS, Backward
from keel.integrations._handoff import Handoff
from keel.integrations._loop_scheduler import LoopScheduler
from keel.integrations._loss import StepLoss
from keel.signals._hooks import ObserverHook


class Watch:
    """A `Guard` driven by the loop's own calls (see the module docstring). Made by `watch`.

    Attributes:
        guard: The `Guard` deciding each update; `Watch` also answers for its attributes (``decisions``,
            ``findings``, ``global_step``, ``recovery`` …).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        scheduler: Any | Sequence[Any] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        **guard_kwargs: Any,
    ) -> None:
        if optimizer is None:
            raise ValueError(
                "keel.watch(model, optimizer=None): keel acts at the loop's optimizer.step(), and this loop has no "
                "optimizer; allowed: a torch.optim.Optimizer. A loop that updates by hand (pytorch/examples' "
                "word_language_model: p.data.add_(p.grad, alpha=-lr)) gets the same update from "
                "opt = torch.optim.SGD(model.parameters(), lr=lr): call opt.step() there, and write a new LR into "
                "opt.param_groups"
            )
        given = _as_tuple(optimizer, "optimizer")
        self._parts = tuple(fabric_wrapped(part) for part in given)
        scaler = grad_scaler_of(scaler if scaler is not None else fabric_scaler_of(given))
        schedulers = _as_tuple(scheduler, "scheduler")
        if len(self._parts) > 1 and scaler is not None:
            raise ValueError(
                f"scaler with {len(self._parts)} optimizers: not supported (the scaler unscales and steps each "
                "optimizer on its own); allowed: one optimizer with a scaler, or bf16 / fp32 without one"
            )
        stepped = Optimizers(*self._parts) if len(self._parts) > 1 else self._parts[0]
        held = Schedulers(*schedulers) if len(schedulers) > 1 else next(iter(schedulers), None)
        # A GradScaler another open watch hooks already (a GAN's one scaler for D and G) is that watch's to step
        # and update; this one only divides its losses by the scale, and its update comes through scaler.step.
        hooks_scaler = scaler is not None and id(scaler) not in _HOOKED_SCALERS
        own_scaler = scaler if hooks_scaler else None
        self.guard = Guard(model, stepped, held, scaler=own_scaler, steps_scheduler=False, **guard_kwargs)
        self._scaler = scaler  # the scale of the losses backward sees
        self._own_scaler = own_scaler
        self._default_detectors = guard_kwargs.get("detectors") is None
        self._called: set[int] = set()  # the parts whose step() the loop has called for the update to come
        self._called_part = ""  # the class of the optimizer whose step() the loop called last
        self._held_calls: list[Callable[[], Any]] = []  # the loop's calls between them, made after that update
        self._scaler_checked = False  # the unseen-scaler check, made at the first update
        self._schedulers = [LoopScheduler(observe=self.guard.policy == "observe") for _ in schedulers]
        self._decided = 0  # the guard's decisions already counted for the schedulers
        self._watched = {id(p) for p in model.parameters()}
        self._copy_shapes = _copy_shapes(model)  # to know a copy of it (`_non_finite_copies`)
        # NaN copies of the model found at a rollback, with their parameters' versions then: named at the next update
        # if the loop has written them since (`_name_an_updated_suspect`)
        self._suspects: list[tuple[weakref.ref[nn.Module], int, int]] = []
        self._trained = [p for p in model.parameters() if p.requires_grad]
        # a loop that never calls the optimizer's step: _check_stepped
        self._backwards_seen, self._drops, self._step_called = 0, 0, False
        self._recorded, self._from_output, self._from_backward = StepLoss(), StepLoss(), StepLoss()
        self._bare_outputs = _BareOutputs()  # the model's scalar outputs, until the loop calls backward() on one
        self._backwards: list[
            tuple[Backward, Tensor, Tensor | None]
        ] = []  # this update's backward losses, until another takes them
        self._last_loss: Tensor | None = None
        self._norm_before_clip: Tensor | None = None
        self._clipped: set[int] = set()  # the parameters the loop's clipping calls of this update covered
        self._clipped_norm_type: Any = None
        self._warned: set[str] = set()
        self._check_unseen_scheduler()
        self._closed = False
        self._handoff = Handoff()
        self._hook = model.register_forward_hook(ObserverHook(self._capture_output), with_kwargs=True)
        for part in self._parts:
            _WATCH_OF_OPTIMIZER[id(part)] = self
            self._handoff.gate(part, "step", functools.partial(self._optimizer_step, part))
            if len(self._parts) > 1:  # `for opt in optimizers: opt.step(); opt.zero_grad()`: see _held_zero_grad
                self._handoff.gate(part, "zero_grad", functools.partial(self._held_zero_grad, part))
        if own_scaler is not None:
            self._handoff.gate(own_scaler, "step", self._scaler_step)
            self._handoff.gate(own_scaler, "update", self._after_update)
            _HOOKED_SCALERS.add(id(own_scaler))
        for loop_scheduler, gated in zip(self._schedulers, schedulers, strict=True):
            self._handoff.gate_scheduler(gated, functools.partial(self._scheduler_call, loop_scheduler))
        self._handoff.gate(torch.nn.utils, "clip_grad_norm_", self._clip)
        if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
            self._handoff.gate(torch.nn.utils, "clip_grads_with_norm_", self._clip_with_norm)
        self._handoff.gate(torch.Tensor, "backward", self._capture_backward)
        OWNERS.open(id(self), model.parameters())
        atexit.register(self._close_at_exit)

    # --- the loss -----------------------------------------------------------------------------------
    def record(self, loss: Tensor | float) -> None:
        """Give keel this micro-batch's loss (undivided); the step's loss is the mean of those recorded."""
        self._recorded.add(loss if isinstance(loss, Tensor) else torch.tensor(float(loss)))

    def _capture_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            loss = output_loss(output)
            if loss is not None:
                self._from_output.add(loss)
            elif _is_scalar_loss(output):  # the model's loss, if the loop calls backward() on this very tensor
                self._bare_outputs.note(output)

    def _capture_backward(self, original: Any, tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._called:  # refused before it runs: the other optimizers' step() calls are still to come
            error = ValueError(BACKWARD_BETWEEN.format(n=len(self._parts), stepped=self._called_part))
            self._finish(error)
            raise error
        if not _is_scalar_loss(tensor):
            return original(tensor, *args, **kwargs)
        if self._bare_outputs.take(tensor):  # `loss = model(x, y); loss.backward()`: the model's loss, undivided
            self._from_output.add(tensor)
        if not self._step_called:
            self._check_stepped(dropped=True)
        count = _count_factor(tensor)  # (read before the backward frees what the graph saved)
        backward, first = OWNERS.enter(tensor)
        try:
            result = original(tensor, *args, **kwargs)
            if id(self) in OWNERS.settle(backward):  # (the models it reached are known once it has run)
                self._owe(backward, tensor, count)
            return result
        finally:
            if first:
                OWNERS.leave()

    def _owe(self, backward: Backward, loss: Tensor, count: Tensor | None = None) -> None:
        """Keep a backward's loss that reached this model (and the count it was multiplied by, see `_count_factor`),
        until an update takes it."""
        scale = self._loss_scale()
        kept = [owed for owed in self._backwards if not owed[0].taken]  # another watch's now: a newer one came
        if len(kept) < len(self._backwards) and self._default_detectors:
            # a loss that reached this model went to another model's update, and this model trains on its own
            # next one: the two are trained against each other (a GAN's errG reached D)
            self._warn("adversarial", ADVERSARIAL)
        self._backwards = kept
        self._backwards.append((backward, loss.detach() / scale if scale is not None else loss.detach(), count))
        self._backwards_seen += 1

    def _loss_scale(self) -> Tensor | None:
        """The factor the GradScaler put on the losses that backward sees; None when none is scaling."""
        scaler = self._scaler
        return scaler._scale if scaler is not None and scaler.is_enabled() else None

    def _backward_loss(self) -> Tensor | None:
        """This update's share of the backward losses: those no other watch's update has taken since (see
        `keel.integrations._backward_owner`); they are taken now. When another watch's update took them all and no
        newer backward reached this model, they are this update's too: one loss of two models trained together
        (an encoder and a decoder, one optimizer each)."""
        untaken = [owed for owed in self._backwards if not owed[0].taken]
        for backward, loss, count in untaken or self._backwards:
            backward.taken = True
            self._from_backward.add(loss, share=True, count=count)
        self._backwards = []
        return self._from_backward.take()

    def _step_loss(self) -> Tensor:
        recorded, output, backward = self._recorded.take(), self._from_output.take(), self._backward_loss()
        loss = next((x for x in (recorded, output, backward) if x is not None), None)
        if loss is None:
            self._warn(
                "no loss",
                "keel.watch saw no loss this step (no scalar in the model's output, no backward "
                "of a scalar): it reuses the last one; call guard.record(loss) each micro-batch",
            )
            loss = self._last_loss if self._last_loss is not None else torch.zeros(())
        self._last_loss = loss
        return loss

    # --- the loop's clipping ------------------------------------------------------------------------
    def _clip(self, original: Any, parameters: Tensor | Iterable[Tensor], *args: Any, **kwargs: Any) -> Any:
        params = _as_list(parameters)
        norm = original(params, *args, **kwargs)
        self._keep_norm(params, norm, kwargs.get("norm_type", args[1] if len(args) > 1 else 2.0))
        return norm

    def _clip_with_norm(
        self,
        original: Any,
        parameters: Tensor | Iterable[Tensor],
        max_norm: float,
        total_norm: Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # torch's clipping in two parts, get_total_norm then this (accelerate's clip_grad_norm_ does so; torch's own
        # clip_grad_norm_ calls a private copy, so a norm is not kept twice): total_norm is the norm before clipping
        params = _as_list(parameters)
        result = original(params, max_norm, total_norm, *args, **kwargs)
        self._keep_norm(params, total_norm)
        return result

    def _keep_norm(self, params: list[Tensor], norm: Any, norm_type: Any = 2.0) -> None:
        """The norm before clipping, for the update, when the clipped parameters are this model's. A loop that clips
        parts of the model apart (an encoder and a decoder, a call each) gets their norm together, as one call over
        both would give it: judged on the last part alone, a spike in the first was hidden. A second call over
        parameters clipped already sees clipped gradients: the first call's norm stays."""
        ids = {id(p) for p in params}
        if not isinstance(norm, Tensor) or ids.isdisjoint(self._watched):
            return
        kept, kept_type = self._norm_before_clip, self._clipped_norm_type
        if kept is None or kept_type != norm_type:
            self._norm_before_clip, self._clipped, self._clipped_norm_type = norm, ids, norm_type
        elif not ids & self._clipped:
            pair = torch.stack([kept.detach().float(), norm.detach().to(kept.device).float()])
            self._norm_before_clip = torch.linalg.vector_norm(pair, ord=float(norm_type))
            self._clipped |= ids

    # --- the update ---------------------------------------------------------------------------------
    def _optimizer_step(self, part: Any, original: Any, *args: Any, **kwargs: Any) -> Any:
        self._step_called = True  # the loop steps the optimizer (also where keel passes the call through)
        closure, others = _closure_of(args, kwargs)  # (accelerate's wrapper calls the watched one with closure=None)
        if others or (closure is not None and hasattr(part, "base_optimizer")):
            text = SAM_STYLE if hasattr(part, "base_optimizer") else PASSED_THROUGH
            self._warn("closure", text.format(name=type(part).__name__))
            return original(*args, **kwargs)
        result = None
        if closure is not None:  # Lightning's LightningOptimizer.step() always gives one (its precision plugin's)
            with torch.enable_grad():  # evaluated once, as torch's single-evaluation optimizers (SGD, AdamW) do
                result = closure()
        gradients = getattr(part, "gradient_state", None)  # accelerate's AcceleratedOptimizer
        if gradients is not None and not getattr(gradients, "sync_gradients", True):
            original()  # a micro-batch inside accumulate(): accelerate's step does nothing there
            return result
        if self._scaler is None and not self._scaler_checked:  # a loop steps through a GradScaler always or never
            self._check_unseen_scaler()
        if not self._scaler_checked:  # a scheduler built after this watch (the line after it) marks step since
            self._check_unseen_scheduler()
        self._scaler_checked = True
        self._called.add(id(part))
        self._called_part = type(part).__name__
        if len(self._called) < len(self._parts):
            return result  # keel updates them all at the last one's call: the loop readies each one's gradients first
        self._called.clear()
        self._update()
        held, self._held_calls = self._held_calls, []
        for call in held:
            call()
        return result

    def _scheduler_call(self, loop_scheduler: LoopScheduler, original: Any, *args: Any, **kwargs: Any) -> Any:
        """The loop's ``scheduler.step()``: between the optimizers' step() calls of one update (modded-nanogpt's
        ``for opt, sched in zip(optimizers, schedulers): opt.step(); sched.step()``) it is held until keel has made
        that update, so the update runs at the LR the loop set for it; else as `LoopScheduler.loop_call` says."""
        if self._called:
            self._held_calls.append(functools.partial(loop_scheduler.loop_call, original, *args, **kwargs))
            return None
        return loop_scheduler.loop_call(original, *args, **kwargs)

    def _held_zero_grad(self, part: Any, original: Any, *args: Any, **kwargs: Any) -> Any:
        """A part's ``zero_grad()`` right after its ``step()`` (``for opt in optimizers: opt.step();
        opt.zero_grad()``), before the others' calls: held until keel has made the update, which would else step
        that part on no gradients."""
        if id(part) in self._called:
            self._held_calls.append(functools.partial(original, *args, **kwargs))
            return None
        return original(*args, **kwargs)

    def _check_stepped(self, *, dropped: bool) -> None:
        """Warn once when the loop trains the model without the optimizer's ``step()``: at a backward, when the
        gradients of earlier ones were dropped (``zero_grad``) twice with no update since (``dropped``), or at the
        end, when backwards ran and no update came. One drop is not enough: SAM's ``first_step(zero_grad=True)``
        drops the first of the two backwards of each update. Called until the first update only."""
        if not self._backwards_seen:
            return
        if dropped:
            if not (self._backwards and self._trained and all(p.grad is None for p in self._trained)):
                return
            self._drops += 1
            if self._drops < 2:
                return
        sam_style = any(hasattr(part, "base_optimizer") for part in self._parts)
        text = SAM_STYLE if sam_style else NEVER_STEPPED
        self._warn("never stepped", text.format(name=type(self._parts[0]).__name__))

    def _check_unseen_scheduler(self) -> None:
        """Warn once when an LR scheduler keel was not given is built on the optimizer (before this watch, or after
        it: torch marks the optimizer's ``step`` either way; checked here and again at the first update)."""
        if not self._schedulers and any(_has_lr_scheduler(part) for part in self._parts):
            self._warn(
                "scheduler",
                "keel.watch: the optimizer has an LR scheduler keel was not given: a skipped update still advances "
                "it and a rollback does not restore it; allowed: keel.watch(model, optimizer, scheduler, ...)",
            )

    def _check_unseen_scaler(self) -> None:
        """Warn once when an enabled GradScaler keel was not given makes the loop's ``optimizer.step()`` call
        (``scaler.step(optimizer)``): the losses keel sees are then the scaled ones."""
        frame = sys._getframe(1)
        for _ in range(4):  # this method ← _optimizer_step ← the gate ← GradScaler._maybe_opt_step
            frame = frame.f_back  # type: ignore[assignment]
            if frame is None:
                return
            caller = frame.f_locals.get("self") if frame.f_code.co_name == "_maybe_opt_step" else None
            if isinstance(caller, torch.amp.GradScaler) and caller.is_enabled():
                self._warn("unseen scaler", UNSEEN_SCALER)
                return

    def _scaler_step(self, original: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if optimizer is not self._parts[0] or args or kwargs:
            result = original(optimizer, *args, **kwargs)
            other = _WATCH_OF_OPTIMIZER.get(id(optimizer))
            if other is not None and other is not self and _scaler_skipped(self._scaler, optimizer):
                other._drop_the_losses_of_a_skipped_update()
            return result
        self._update()
        return None

    def _drop_the_losses_of_a_skipped_update(self) -> None:
        """The shared GradScaler skipped this watch's update itself (an overflow in a GAN's G): its ``step()`` was
        never called, so this update's losses are dropped here. Kept, a loss that ran through the other model too
        (G's, through D) went to that model's next update: its NaN was recorded as D's loss, and D's applied update
        as the scaler's skip. (This watch records nothing for the update the scaler skipped.)"""
        for backward, _, _ in self._backwards:
            backward.taken = True
        self._backwards = []
        self._recorded.take()
        self._from_output.take()

    def _after_update(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        # keel already updated the scaler after its step (or its skip, or its rollback)
        return None if self._handoff.handled else original(*args, **kwargs)

    def _update(self) -> Decision:
        OWNERS.drop_outside()
        self._bare_outputs.clear()
        self._step_called = True
        loss, norm, self._norm_before_clip = self._step_loss(), self._norm_before_clip, None
        self._clipped_norm_type = None  # the next update's clipping starts afresh
        self._handoff.handled = True
        try:
            with self._handoff.acting_for_keel():
                return self.guard.step(loss, grad_norm=norm)
        except TrainingAborted:
            self.close()
            raise
        finally:
            decisions = self.guard.decisions
            not_applied = sum(not d.stepped and not skipped_for_a_surge(d) for d in decisions[self._decided :])
            for loop_scheduler in self._schedulers:
                loop_scheduler.after_update(not_applied)
            if self._suspects:
                self.guard.components.call("unrestored copies", self._name_an_updated_suspect)
            rolled_back = any(d.action == "rollback" for d in decisions[self._decided :])
            if rolled_back and "unrestored copy" not in self._warned:
                self.guard.components.call("unrestored copies", self._check_unrestored_copies)
            self._decided = len(decisions)

    def _check_unrestored_copies(self) -> None:
        """After a rollback, name a copy of the model's weights that the loop keeps and keel was not given, when it
        holds NaN/Inf: DiT's ``ema = deepcopy(model)``, made before `watch`, averaged the broken update, and the
        rollback left it so for good (an EMA is restored only when registered with `Guard.track`; one registered is
        restored by now). A finite copy — a frozen reference model, an EMA the damage did not reach — is not named: it
        may be meant to stay."""
        step = self.guard.decisions[-1].step
        copies = _non_finite_copies(self._copy_shapes, self._watched)
        self._suspects = [(weakref.ref(copy), _version_of(copy), step) for copy in copies]

    def _name_an_updated_suspect(self) -> None:
        """At the update after a rollback: name the first NaN copy the loop has written since (the version counters
        of its parameters moved: an EMA the loop updates) or, when this update's loss is non-finite with the restored
        weights, that the loop computes its loss with (a target network, which CleanRL's loops write through
        ``.data``: no version counter moves); not one that lies untouched (a model or EMA of an earlier run in the
        same process, still referenced)."""
        suspects, self._suspects = self._suspects, []
        used = _loss_not_finite(self.guard.decisions[-1])
        for ref, version, step in suspects:
            copy = ref()
            if copy is not None and (used or _version_of(copy) != version):
                self._warn("unrestored copy", UNRESTORED_COPY.format(name=type(copy).__name__, step=step))
                return

    # --- the end ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Put the loop's objects back and close the `Guard` (store flushed). Safe to call twice."""
        self._finish(None)

    def _close_at_exit(self) -> None:
        """A loop that never closed its watch ends here: as finished, or as failed when an exception ended it
        (``atexit`` runs this before the Guard's own exit hook, so the exception is passed on here)."""
        exc = getattr(sys, "last_value", None)  # set when an exception reached the top level
        self._finish(exc if isinstance(exc, BaseException) else None)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        if not self._step_called and exc is None:
            self._check_stepped(dropped=False)
        OWNERS.close(id(self))
        for part in self._parts:
            if _WATCH_OF_OPTIMIZER.get(id(part)) is self:
                del _WATCH_OF_OPTIMIZER[id(part)]
        if self._own_scaler is not None:
            _HOOKED_SCALERS.discard(id(self._own_scaler))
        self._handoff.restore()
        self._hook.remove()
        self.guard.__exit__(type(exc) if exc is not None else None, exc, None)

    def __getattr__(self, name: str) -> Any:
        if name == "guard":  # not built yet: __init__ failed
            raise AttributeError(name)
        return getattr(self.guard, name)

    def _warn(self, key: str, message: str) -> None:
        """Warn once per key, at the loop's line (`loop_stacklevel`)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, KeelWarning, stacklevel=loop_stacklevel())


def _is_scalar_loss(value: Any) -> bool:
    """A 0-d floating tensor in an autograd graph: what a loop calls ``backward()`` on."""
    return isinstance(value, Tensor) and value.ndim == 0 and value.is_floating_point() and value.grad_fn is not None


class _BareOutputs:
    """The 0-d tensors the model returned bare (``loss = model(x, y)``, nanochat's and modded-nanogpt's GPT), held by
    weak reference. A bare tensor is not taken as the loss when the model returns it (a value head's prediction for
    one state is one too); it is when the loop calls ``backward()`` on that very tensor: then it is the model's loss,
    as the loop's own log shows it. Taken from the backward instead, the step's loss was the sum of its micro-batches'
    where the loop divides the gradients, not the losses, by its accumulation steps (modded-nanogpt's
    ``p.grad /= train_accumulation_steps``): 4x the loop's loss with 4 micro-batches."""

    def __init__(self) -> None:
        self._held: dict[int, weakref.ref[Tensor]] = {}

    def note(self, output: Tensor) -> None:
        if len(self._held) >= 16:  # forwards whose output never reached a backward (their tensors are gone)
            self._held = {key: ref for key, ref in self._held.items() if ref() is not None}
        self._held[id(output)] = weakref.ref(output)

    def take(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is one of the held outputs (then no longer held)."""
        ref = self._held.pop(id(tensor), None)
        return ref is not None and ref() is tensor

    def clear(self) -> None:
        self._held.clear()


def _of_parameters_alone(value: Tensor, most: int = 3) -> bool:
    """Whether ``value`` was computed from leaf parameters alone in at most ``most`` autograd steps: a learnt
    temperature a model returns, as open_clip's CLIP returns ``image_features, text_features, self.logit_scale.exp()``
    (its default, ``output_dict=False``). Taken for the loss (the one scalar of the tuple), it made keel judge the
    temperature: a healthy run's rise 14.3 → 18.2 as CLIP learns was a divergence warning, and the loss was not seen.
    A loss depends on the batch: through more steps, or through an input that takes no gradient (a None edge)."""
    if value.grad_fn is None:
        return value.requires_grad  # a parameter returned as it is
    pending, steps = [value.grad_fn], 0
    while pending:
        fn = pending.pop()
        if type(fn).__name__ == "AccumulateGrad":
            continue
        steps += 1
        edges = [edge for edge, _ in fn.next_functions]
        known = [edge for edge in edges if edge is not None]
        if steps > most or len(known) < len(edges):
            return False
        pending.extend(known)
    return True


def _count_factor(loss: Tensor) -> Tensor | None:
    """The integer ``loss`` is the product by, when the loop weights each micro-batch's mean loss by its count before
    ``backward()`` and divides the gradients by the step's total later: torchtune's recipes, ``current_loss =
    loss_step(batch) * current_num_tokens``, ``current_loss.backward()``, then ``scale_grads(model, 1 / num_tokens)``.
    Summed as they are, those products are the loss times the step's token count, which moves with the batch's
    padding: a step of garbage labels (the per-token loss 2.3 → 6.0) read 417 → 1060 beside healthy steps of 370–661,
    and no detector named it. A 0-d integer tensor is a count, never a learnt weight; None otherwise (also a product by
    a float, as the GradScaler's)."""
    fn = loss.grad_fn
    if fn is None or type(fn).__name__ != "MulBackward0":
        return None
    for saved in ("_saved_other", "_saved_self"):  # the factor that takes no gradient is the one saved
        factor = getattr(fn, saved, None)
        if isinstance(factor, Tensor) and factor.numel() == 1 and not factor.is_floating_point():
            if not factor.is_complex() and factor.dtype != torch.bool:
                return factor
    return None


def _version_of(module: nn.Module) -> int:
    """The sum of its parameters' version counters: every in-place write (``mul_``, ``lerp_``, ``copy_``) moves it."""
    return sum(p._version for p in module.parameters())


def _copy_shapes(model: nn.Module) -> list[list[torch.Size]]:
    """The parameter shapes, in order, of the modules whose copies the loop may keep: the model, and each member of a
    model that is a list or dict of networks (SAC's two critics, one optimizer, watched as ``nn.ModuleList([qf1,
    qf2])``, each with a target network of its own)."""
    parts = list(model.children()) if isinstance(model, nn.ModuleList | nn.ModuleDict) else []
    shapes = [[p.shape for p in module.parameters()] for module in (model, *parts)]
    return [s for i, s in enumerate(shapes) if s and s not in shapes[:i]]


def _loss_not_finite(decision: Decision) -> bool:
    """Whether ``decision`` found the step's loss NaN/Inf."""
    return any(f.kind == "non_finite" and f.signal == keys.LOSS for f in decision.findings)


def _non_finite_copies(shapes: list[list[torch.Size]], watched: set[int]) -> list[nn.Module]:
    """The live modules with the parameter shapes of the watched model or of a member of it (`_copy_shapes`), in
    order, none of them the model's own tensors, that hold a NaN/Inf: copies of the model's weights gone bad — an EMA
    the loop keeps (DiT's ``deepcopy(model)``, timm's ``ModelEmaV3``, ``AveragedModel``), a target network (DQN's,
    SAC's, TD3's), or a model of an earlier run in the same process; `_name_an_updated_suspect` tells them apart at
    the next update. One no longer referenced is collected first. A walk over the objects the
    garbage collector tracks: made once, at a rollback, never on a step."""
    gc.collect()
    copies = []
    for obj in gc.get_objects():
        if not issubclass(type(obj), nn.Module):  # not isinstance: it reads __class__, which some objects warn on
            continue
        params = list(obj.parameters())
        if not any(len(params) == len(s) for s in shapes) or any(id(p) in watched or is_lazy(p) for p in params):
            continue
        if [p.shape for p in params] not in shapes:
            continue
        if not all(bool(torch.isfinite(p).all()) for p in params):
            copies.append(obj)
    return copies


def _closure_of(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """The closure an ``optimizer.step(...)`` call was given (None: none), and whether it was given anything else."""
    if "closure" in kwargs:
        closure, positional = kwargs["closure"], args
    else:
        closure, positional = (args[0], args[1:]) if args else (None, ())
    rest = (v for k, v in kwargs.items() if k != "closure")
    return closure, any(a is not None for a in (*positional, *rest))


def _as_list(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """A clipping call's parameters as a list (a generator is read once, here)."""
    return [parameters] if isinstance(parameters, Tensor) else list(parameters)


def _has_lr_scheduler(optimizer: Any) -> bool:
    """Whether a torch LR scheduler was built on ``optimizer`` (it marks the optimizer's ``step``; accelerate's
    prepared optimizer holds the marked one as ``.optimizer``)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return any(getattr(getattr(o, "step", None), "_wrapped_by_lr_sched", False) for o in (optimizer, inner))


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    scheduler: Any | Sequence[Any] | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    **guard_kwargs: Any,
) -> Watch:
    """Put a keel `Guard` on a training loop without changing the loop: one line after the optimizer is made.

    Args:
        model: The model being trained (DDP- or ``torch.compile``-wrapped as the loop calls it).
        optimizer: The optimizer the loop steps, or a list of them (Muon + AdamW): keel decides once per update,
            at the last of their ``step()`` calls, and steps, skips or restores them all (`keel.Optimizers`);
            the loop steps every one of them at each update, after one backward (a backward between their calls
            is refused with a ValueError before it runs, and the watch closed; a GAN's loop takes one watch per
            model and optimizer). The optimizer Lightning Fabric's ``fabric.setup`` returned is taken as the one it
            wraps (`keel.guard.fabric`), and its ``16-mixed`` GradScaler as ``scaler`` unless one is given.
        scheduler: The loop's LR scheduler (or a list, one per optimizer), if it has one: snapshots hold its
            state; the loop keeps stepping it (per update, per epoch or with a metric), and its call after an
            update keel skipped is withheld.
        scaler: The loop's ``torch.amp.GradScaler``, if it has one (enabled or not); timm's ``NativeScaler``
            (train.py's ``loss_scaler``) is taken as the GradScaler it holds.
        **guard_kwargs: Any other `Guard` argument: ``policy``, ``run_dir``, ``probes``, ``recovery`` …

    Returns:
        The `Watch`; keep it to read ``decisions`` or to ``close()`` early (it closes itself at exit).

    Example:
        >>> model = nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = watch(model, opt, policy="skip")
        >>> loss = model(torch.ones(2, 4)).pow(2).mean()
        >>> loss.backward()
        >>> opt.step()  # keel measured, decided and stepped
        >>> guard.global_step
        1
        >>> guard.close()
    """
    return Watch(model, optimizer, scheduler, scaler=scaler, **guard_kwargs)


def _as_tuple(value: Any, name: str) -> tuple[Any, ...]:
    """``None`` → (), one object → (it,), a list or tuple → its items (at least one)."""
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(f"{name}=[]; allowed: one {name} or a non-empty list of them")
        return tuple(value)
    return (value,)


_HOOKED_SCALERS: set[int] = set()  # the GradScalers an open watch steps and updates (one watch each)
_WATCH_OF_OPTIMIZER: weakref.WeakValueDictionary[int, Watch] = weakref.WeakValueDictionary()  # open watches' parts


def _scaler_skipped(scaler: Any, optimizer: Any) -> bool:
    """Whether the GradScaler's ``step(optimizer)`` just found inf/NaN gradients and so skipped the update (read from
    its per-optimizer flags, which its step read on the host already)."""
    states = getattr(scaler, "_per_optimizer_states", None)
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    flags = state.get("found_inf_per_device") if isinstance(state, dict) else None
    return isinstance(flags, dict) and any(isinstance(f, Tensor) and bool(f.item()) for f in flags.values())


UNSEEN_SCALER = (
    "keel.watch: the loop steps the optimizer through a GradScaler keel was not given (scaler.step(optimizer)): the "
    "loss keel sees is the scaled one (× the scale, which doubles as the scaler grows: taken for loss spikes) and the "
    "scaler's own overflow skips are not recorded; pass it: keel.watch(model, optimizer, scaler=scaler). Under "
    "Lightning Fabric's 16-mixed, give keel.watch the model and optimizer fabric.setup returned: it takes Fabric's "
    "scaler"
)

PASSED_THROUGH = (
    "keel.watch: {name}.step() was given arguments besides a closure: the call is passed through unwatched, and keel "
    "judges nothing there (keel evaluates a closure once, as torch.optim.SGD and AdamW do, then makes its update); "
    "allowed: optimizer.step() or optimizer.step(closure)"
)

SAM_STYLE = (
    "keel.watch: {name} keeps a base optimizer that makes the update (optimizer.base_optimizer: SAM, ASAM, GSAM "
    "step it after their second backward), so keel, given {name}, judges nothing: no skip, no rollback, no record. "
    "Allowed: keel.watch(model, optimizer.base_optimizer)"
)

NEVER_STEPPED = (
    "keel.watch: the loop ran backward() on the model and never called step() of the optimizer keel was given (the "
    "gradients were dropped, or the run ended, with no update): the loop updates the parameters some other way, as "
    "pytorch/examples' word_language_model does by hand (p.data.add_(p.grad, alpha=-lr)), and keel judges nothing: no "
    "skip, no rollback, no record. Allowed: let the optimizer make the update, opt.step() where the loop updated by "
    "hand (torch.optim.SGD(model.parameters(), lr=lr) makes the same update), and write a new LR into "
    "opt.param_groups"
)

BACKWARD_BETWEEN = (
    "keel.watch with {n} optimizers: a backward() ran between their step() calls of one update (after "
    "{stepped}.step(), before the others'). keel decides once per update and steps every optimizer of the list at "
    "the last one's step(): the earlier ones would step on this backward's gradients, not on those they were called "
    "for. keel closed this watch and this backward did not run. Allowed: one backward, then each optimizer's step() "
    "(Muon + AdamW); a loop with a backward per optimizer (a GAN: D's backward and step, then G's) takes one "
    "keel.watch per model and optimizer: keel.watch(netD, optimizerD); keel.watch(netG, optimizerG)"
)

UNRESTORED_COPY = (
    "keel.watch: the rollback at step {step} restored the model, but a copy of its weights the loop keeps (a {name} "
    "with the model's parameter shapes: a model EMA, as DiT's ema = deepcopy(model), or a target network, as DQN's, "
    "SAC's and TD3's) holds NaN/Inf and keel was not given it, so it stays so: whatever the loop samples, evaluates "
    "or saves from it is lost, and TD targets computed with it are NaN. Register it before the first step, "
    "guard.track(ema, name='ema') or guard.track(target_network, name='target'), and a rollback restores it with "
    "the model"
)

ADVERSARIAL = (
    "keel.watch: a loss that reached the models of two watches went to one's update while the other trained on a "
    "loss of its own: models trained against each other (a GAN), or an actor and its critic (SAC, TD3, DDPG: the "
    "actor's loss runs through the critic). Their losses rise and fall by design, and keel's loss spike and "
    "divergence detectors take that for instability (on pytorch/examples' dcgan shape a clean run's generator was "
    "rolled back; on CleanRL's sac_continuous_action and td3_continuous_action shapes a clean run was aborted). "
    "Give both watches "
    "detectors=adversarial_detectors() (from keel.integrations.watch import adversarial_detectors): non-finite "
    "values and gradient spikes are still caught"
)


def adversarial_detectors() -> list[Detector]:
    """keel's default detectors without those that judge the loss's level (its spikes, its divergence): for
    models trained against each other (a GAN's generator and discriminator, one `watch` each), whose losses rise
    and fall by design. Non-finite values, gradient-norm spikes and the predictive detectors stay."""
    return [
        d
        for d in default_detectors()
        if not isinstance(d, DivergenceDetector) and not (isinstance(d, SpikeDetector) and d.config.signal == keys.LOSS)
    ]


def grad_scaler_of(scaler: Any) -> Any:
    """The GradScaler to hook: the one given, or the one a wrapper holds as ``_scaler`` (timm's ``NativeScaler``,
    whose ``__call__`` runs that GradScaler's scale, unscale_, step and update); anything else is passed on for the
    Guard to refuse with its one error."""
    inner = getattr(scaler, "_scaler", None)
    if not isinstance(scaler, torch.amp.GradScaler) and isinstance(inner, torch.amp.GradScaler):
        return inner
    return scaler


def output_loss(output: Any) -> Tensor | None:
    """The loss in a model's output: ``output.loss``, ``output["loss"]``, or the one 0-d floating tensor of a
    tuple or list (``logits, loss = model(x, y)``) that is not a function of the parameters alone (open_clip's
    ``image_features, text_features, logit_scale.exp()``: `_of_parameters_alone`); None when there is none or more
    than one."""
    if isinstance(output, Tensor):
        return None
    if hasattr(output, "keys") and hasattr(output, "get"):
        loss = output.get("loss")
    elif isinstance(output, tuple | list):
        scalars = [x for x in output if isinstance(x, Tensor) and x.ndim == 0 and x.is_floating_point()]
        scalars = [x for x in scalars if not _of_parameters_alone(x)]
        loss = scalars[0] if len(scalars) == 1 else None
    else:
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


__all__ = ["Watch", "watch", "adversarial_detectors", "output_loss"]
