"""Hugging Face ``Trainer`` adapter: `KeelCallback` puts a keel `Guard` in charge of the Trainer's updates.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[KeelCallback(run_dir="runs/hf", policy="skip")])
    trainer.train()

How it fits the Trainer's loop (transformers ≥ 4.40):

- **loss**: taken from the model's output (``outputs.loss``) by a forward hook, micro-batch by micro-batch,
  before the Trainer's ``logging_nan_inf_filter`` (on by default) replaces a NaN or Inf loss in its logs by
  the running average — keel still sees it. When the output has none — the Trainer computes the loss itself
  under ``label_smoothing_factor`` (run_translation's and run_summarization's ``--label_smoothing_factor``) or
  with ``compute_loss_func`` — keel takes the loss the Trainer backpropagates (the value it logs; divided by the
  GradScaler's scale under fp16); `record_loss` takes precedence over it.
- **update**: the Trainer's ``optimizer.step()`` goes to ``Guard.step``, which steps the wrapped torch
  optimizer (through accelerate's GradScaler under fp16), skips or rolls back, and steps the LR scheduler
  only after an applied update; the Trainer's own ``lr_scheduler.step()`` then does nothing
  (`keel.integrations._handoff`). The learning rate the Trainer logs, read between the two calls, is the update's,
  as without keel (the scheduler's ``get_last_lr()`` answers with it until the step ends), keel's LR back-off included.
- **clipping**: keel measures gradients before clipping, so a gradient spike is still visible. Under
  ``"skip"`` and ``"recover"`` it takes over ``max_grad_norm`` for the run (the formula of
  ``clip_grad_norm_``, equal up to rounding of the coefficient) and sets the Trainer's to 0 during each update (the
  user's value between updates, where the Trainer saves its checkpoints' ``training_args.bin``); under
  ``"observe"`` the Trainer clips as usual, training stays bit-identical, and keel sees clipped gradients.
  The Trainer computes the gradient norm itself even at ``max_grad_norm=0`` and its ``clip_grad_norm_(…, inf)``
  turns every gradient into NaN when one is: keel then names all parameters, and still skips the step. A Trainer
  subclass that overrides ``_clip_grad_norm`` keeps its clipping and ``max_grad_norm`` (keel setting it to 0 would
  bypass the override: callbacks are not given the Trainer, keel finds it on the event's call stack), is told so
  once, and keel detects on the norm the override returns (the norm before clipping), in every policy.
- **gradient accumulation, bf16/fp16 autocast, schedulers**: as the Trainer does them.
- **evaluation**: the Trainer's eval metrics (``on_evaluate``, e.g. ``eval_strategy="steps"``) go to
  `Guard.record_eval` at the last update: ``eval/eval/<metric>`` (``eval/<name>/<metric>`` for each dataset of a
  dict ``eval_dataset``), the runtime and throughput figures left out; keel follows ``metric_for_best_model``
  with ``greater_is_better`` (default: the loss, lower is better; `keel.integrations._eval`). An eval before the
  first update is recorded at step 0; one after ``train()`` ends is not part of the run. ``eval_tasks`` ties an
  eval to the phase it measures (for the continual metrics); `KeelCallback.phase` marks a switch of task or data
  mix, also before ``train()`` (applied when training begins).
- **a rollback** restores the scheduler with the model while the Trainer's step count goes on: the Trainer would stop
  at ``max_steps`` with the LR schedule short of its end by the updates undone (its annealing lost). keel raises the
  Trainer's ``state.max_steps`` by them and says so (``extend_after_rollback``, `keel.integrations._run_length`); a run
  whose data ends first (an epoch-bounded run) is told at the end how far short its schedule stopped, and one that a
  callback stopped (early stopping, a time budget) is told that. The extension is kept in every checkpoint's
  ``trainer_state.json`` (``stateful_callbacks["keel"]``) and applied again when a ``train()`` resumes from it,
  with keel's actions in force (the LR back-off, the tightened clip) and its escalation counts
  (`keel.integrations._carried`): the resumed run trains at the LR the uninterrupted one would, and says so.
- **when**: the `Guard` is built at ``on_train_begin``, before the first forward, so the hook probes (activation
  RMS, attention, router) see step 0. Each ``train()`` is one keel run: a second ``train()`` with the same
  callback into the same ``run_dir`` is refused up front (`KeelCallback.run_dir`). ``auto_find_batch_size``'s retry
  after an out-of-memory (the Trainer runs its loop again, with a smaller batch, inside the same ``train()``) is the
  same run: keel closes the aborted attempt and starts over in the same ``run_dir``, and says so.

DeepSpeed is not supported (its engine owns the step).
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.decision import Decision
from keel._core.errors import KeelWarning, TrainingAborted
from keel.guard import Guard, console
from keel.guard.options import check_loss, step_needs_an_argument
from keel.integrations._carried import (
    continued_line,
    continued_step,
    earlier_checkpoints_advice,
    kept_baselines,
    kept_history,
    restore_baselines,
    restore_history,
)
from keel.integrations._eval import eval_metrics
from keel.integrations._handoff import Handoff
from keel.integrations._loss import StepLoss
from keel.integrations._options import checked_extend_after_rollback, takes_over_clipping
from keel.integrations._run_length import ScheduleAfterRollbacks, say
from keel.recover import Policy

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("keel.integrations.hf needs transformers: pip install 'keel[hf]'") from exc


class KeelCallback(TrainerCallback):
    """A ``TrainerCallback`` that runs a keel `Guard` inside ``Trainer.train()``.

    Args:
        run_dir: Directory of the run store (rank 0 writes it under torchrun); ``None`` keeps it in memory.
        policy: ``"observe"``, ``"skip"`` or ``"recover"`` (see `Guard`).
        take_over_clipping: Measure gradients before clipping and clip in keel with the Trainer's
            ``max_grad_norm`` (restored at the end of training). ``None``: yes, except under ``"observe"``,
            which leaves the Trainer's own clipping so that training stays bit-identical.
        eval_tasks: Eval name (``"eval"``, or a key of a dict ``eval_dataset``) → the phase it measures
            (`Guard.record_eval`'s ``task``); evals not named are tied to none.
        extend_after_rollback: After a rollback, raise the Trainer's ``state.max_steps`` by the updates it undid
            (the snapshot's scheduler is restored with the model), so the run still makes its planned updates and
            the LR schedule reaches its end; ``False`` keeps ``max_steps`` (the schedule then ends short, and keel
            says by how much). ``TrainingArguments.max_steps`` itself is left as it is.
        **guard_kwargs: Any other `Guard` argument (``probes``, ``detectors``, ``recovery``, ``log_every`` …).

    Attributes:
        guard: The `Guard`, built when training begins (``on_train_begin``, before the first forward, so the hook
            probes see step 0's); ``None`` before.
        run_dir: The run's folder; each ``trainer.train()`` is one keel run, so a second ``train()`` with the same
            callback needs a new one here (or ``overwrite=True`` / ``resume=True``): it is refused otherwise.

    Raises:
        ValueError: A `Guard` argument the callback sets itself, or DeepSpeed.

    Example:
        >>> cb = KeelCallback(policy="skip")  # then Trainer(..., callbacks=[cb])
        >>> cb.guard is None
        True
    """

    def __init__(
        self,
        *,
        run_dir: str | None = None,
        policy: Policy = "observe",
        take_over_clipping: bool | None = None,
        eval_tasks: dict[str, str] | None = None,
        extend_after_rollback: bool = True,
        **guard_kwargs: Any,
    ) -> None:
        self.take_over_clipping = takes_over_clipping(policy, take_over_clipping, guard_kwargs, run_dir)
        if eval_tasks is not None and not (
            isinstance(eval_tasks, dict) and all(isinstance(v, str) and v for v in eval_tasks.values())
        ):
            raise ValueError(f"KeelCallback(eval_tasks={eval_tasks!r}); allowed: None or a dict eval name → phase name")
        self.eval_tasks = dict(eval_tasks or {})
        self.extend_after_rollback = checked_extend_after_rollback(extend_after_rollback)
        self._schedule: ScheduleAfterRollbacks | None = None
        self.run_dir, self.policy, self.guard_kwargs = run_dir, policy, guard_kwargs
        self.guard: Guard | None = None
        self._handoff = Handoff()
        self._loss = StepLoss()
        self._backward_loss = StepLoss()  # what the Trainer backpropagates: the loss when the output has none
        self._last_loss: Tensor | None = None
        self._hook: Any = None
        self._objects: dict[str, Any] = {}
        self._accelerated: Any = None
        self._clip: float | None = None
        self._args: Any = None
        self._warned = False
        self._training = False
        self._pending_phase: str | None = None  # a phase marked before train() (the Guard does not exist yet)
        self._first_step = True
        self._shows_update_lr = False  # the scheduler's get_last_lr() is gated (`_learning_rate_of_the_update`)
        self._update_lr: list[float] | None = None  # the learning rates of the update in flight
        self._runs: list[str] = []  # the run_dirs of the train() calls so far
        self._batch_size: int | None = None  # the Trainer's batch size at the last on_train_begin
        self._ctc_told = False  # said once per callback what an inf CTC loss means
        self._started_at = 0  # the Trainer's step this run started from (resume_from_checkpoint), else 0
        self._norm_before_clip: Tensor | float | None = None  # what an overridden _clip_grad_norm returned

    # --- the Trainer's events -----------------------------------------------------------------------
    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if getattr(args, "deepspeed", None):
            raise ValueError(
                "KeelCallback with deepspeed: not supported (the DeepSpeed engine owns the step); "
                "allowed: DDP, FSDP or a single process"
            )
        assert model is not None and optimizer is not None
        restarted = self._restarted_after_out_of_memory(args, state)
        _close_interrupted(self)
        self._check_new_run()
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        self._objects = {
            "model": model,
            "optimizer": inner,
            "scheduler": lr_scheduler,
            "scaler": getattr(optimizer, "scaler", None),
        }
        self._args, self._first_step = args, True
        self._loss.take(), self._backward_loss.take()  # an aborted attempt's (an out-of-memory in its backward)
        trainer = getattr(self, "trainer", None) or _trainer_calling(self)
        overrides = _overrides_clipping(trainer) if args.max_grad_norm and args.max_grad_norm > 0 else None
        clip = float(args.max_grad_norm) if self.take_over_clipping and args.max_grad_norm and not overrides else None
        self._clip = clip if clip is not None and clip > 0 else None
        # Built before the first forward, so the hook probes (activations, attention, router) see step 0's; whether
        # the model's output carries a loss is only known at the first update (`_first_update`).
        continues = None if restarted is not None else self._continues_the_run(args, state)
        self.guard = self._build_guard(restarted=restarted is not None, continue_at=continues)
        if continues is not None:
            say(self.guard, continued_line(self.guard.run_dir.run_id, str(self.run_dir), continues))
        if restarted is not None:
            say(self.guard, restarted)
        if overrides is not None:
            self._leave_clipping_to(trainer, overrides)
        self._batch_size = getattr(state, "train_batch_size", None)
        self._schedule = (  # a caller with no TrainerState (state=None) has no run length to keep
            ScheduleAfterRollbacks(self.guard, state, extend=self.extend_after_rollback, meta_key="hf")
            if hasattr(state, "max_steps") and hasattr(state, "global_step")
            else None
        )
        resumed_at = getattr(state, "global_step", 0)  # resume_from_checkpoint: keel's steps are the Trainer's
        if resumed_at and self.guard.resumed:
            self._refuse_two_resumes(resumed_at)
        if not resumed_at and self.guard.global_step and not self._runs:
            say(self.guard, _trainer_starts_over(self.guard.global_step, getattr(state, "max_steps", None)))
        self._started_at = continues or 0
        if resumed_at and not self.guard.global_step and not self.guard.resumed:
            self.guard.start_at(resumed_at)
            self._started_at = resumed_at
        if resumed_at and self._schedule is not None:
            self.guard.components.call("hf schedule", self._carry_from_the_checkpoint, state)
        self._runs.append(str(self.run_dir))
        self._training = True
        _OPEN.add(self)
        if self._clip is not None:
            args.max_grad_norm = 0.0
        if self._pending_phase is not None:
            self.guard.phase(self._pending_phase)
            self._pending_phase = None
        self._hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)
        self._handoff.gate(torch.Tensor, "backward", self._capture_backward)
        self._handoff.gate(optimizer, "step", self._optimizer_step)
        self._accelerated = optimizer
        if lr_scheduler is not None and not step_needs_an_argument(lr_scheduler):
            self._handoff.gate_scheduler(lr_scheduler, self._trainers_scheduler_step)
            self._shows_update_lr = callable(getattr(lr_scheduler, "get_last_lr", None))
            if self._shows_update_lr:
                self._handoff.gate(lr_scheduler, "get_last_lr", self._learning_rate_of_the_update)
        # A metric-stepped scheduler (lr_scheduler_type="reduce_lr_on_plateau") stays the Trainer's: it steps it with
        # the evaluation's metric, never per update; keel only snapshots and restores it (steps_scheduler=False).

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._clip is not None:
            args.max_grad_norm = 0.0  # keel clips this update (`on_step_end` gave the value back meanwhile)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._before_a_save(control)
        if self._clip is not None:
            # The user's value between updates, where the Trainer saves its checkpoints (training_args.bin said the
            # run was trained without clipping: reviewer V's V7); set to 0 again when the next update begins.
            args.max_grad_norm = self._clip

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._before_a_save(control)  # (save_strategy="epoch" saves after on_epoch_end)

    def _before_a_save(self, control: Any) -> None:
        """Keep keel's entry in the TrainerState when the Trainer saves a checkpoint next (``control.should_save``,
        which its DefaultFlowCallback, listed before every user callback, has set by now): copying the detectors'
        state on every step cost ~0.24 ms a step for nothing. The store is flushed first: a checkpoint must not cover
        steps the store has not committed (it commits every 0.5 s), or a run killed after the save resumed past
        rows it had lost for good — a run killed in its first half second resumed into an empty store, which keel
        then replaced by a new run."""
        if self.guard is None or not getattr(control, "should_save", True):
            return
        writer = self.guard.recorder.writer
        if writer is not None:
            self.guard.components.call("hf checkpoint", writer.flush)
        if self._schedule is not None:
            self.guard.components.call("hf checkpoint", self._keep_in_the_checkpoint)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._schedule is not None and self.guard is not None:
            stopped = bool(getattr(control, "should_training_stop", False))  # a callback's, or max_steps reached
            self.guard.components.call("hf schedule", self._schedule.at_the_end, stopped)
        self._finish()

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not self._training or not metrics or self.guard is None:
            return  # an eval outside train() is not part of the run
        self.guard.components.call("hf eval", self._record_eval, metrics)  # before the first update: step 0

    def phase(self, name: str) -> None:
        """Mark a switch of task, phase or data mix from the next update on (`Guard.phase`), also before the first.

        Raises:
            ValueError: ``name`` is not a non-empty str.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"KeelCallback.phase(name={name!r}); allowed: a non-empty str, e.g. 'task_b'")
        if self.guard is None or not self._training:
            self._pending_phase = name  # applied when the next train() begins
        else:
            self.guard.phase(name)

    def _record_eval(self, metrics: dict[str, Any]) -> None:
        assert self.guard is not None
        name, ours = _split_eval(metrics)
        follow, greater = getattr(self._args, "metric_for_best_model", None), None
        if follow is not None:
            follow = follow if follow.startswith("eval_") else f"eval_{follow}"  # as the Trainer reads it
            prefix = "eval_" if name == "eval" else f"eval_{name}_"
            follow = follow[len(prefix) :] if follow.startswith(prefix) else None
            greater = getattr(self._args, "greater_is_better", None)
        chosen = eval_metrics(ours, follow=follow, greater_is_better=greater)
        if chosen is not None:
            self.guard.record_eval(chosen[0], name=name, task=self.eval_tasks.get(name), goal=chosen[1])

    # --- the loss -----------------------------------------------------------------------------------
    def record_loss(self, loss: Tensor) -> None:
        """Give keel one micro-batch's loss yourself (when ``compute_loss`` computes it outside the model); the
        step's loss is then the ones given, not the one the Trainer backpropagates."""
        self._loss.add(loss)

    def _capture_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation inside training
        loss = _output_loss(output, kwargs)
        if isinstance(loss, Tensor):
            self._loss.add(loss, share=kwargs.get("num_items_in_batch") is not None)

    def _capture_backward(self, original: Any, tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Keep each scalar the Trainer backpropagates, its share of the step's loss (``training_step`` divides it
        by the accumulation steps unless it is already a share): the loss when the model's output has none."""
        if tensor.ndim == 0 and tensor.is_floating_point() and tensor.grad_fn is not None:
            scaler = self._objects.get("scaler")  # under fp16 accelerate backpropagates scaler.scale(loss)
            scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
            self._backward_loss.add(tensor.detach() / scale if scale is not None else tensor.detach(), share=True)
        return original(tensor, *args, **kwargs)

    # --- the update ---------------------------------------------------------------------------------
    def _optimizer_step(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        loss, backpropagated = self._loss.take(), self._backward_loss.take()
        norm, self._norm_before_clip = self._norm_before_clip, None
        loss = loss if loss is not None else backpropagated
        if self._first_step:
            self._first_step = False
            self._first_update(with_loss=loss is not None)
        if loss is None:
            loss = self._missing_loss()
        self._last_loss = loss
        self._handoff.handled = True
        self._update_lr = self._scheduled_lr()
        # What torch's LR-scheduler wrapper of this step would have marked (it checks the order of calls).
        self._accelerated._opt_called = True
        try:
            with self._handoff.acting_for_keel():
                decision = self._step_guard(loss, norm)
        except BaseException as exc:  # TrainingAborted (or the user's own optimizer error) ends Trainer.train()
            if isinstance(exc, TrainingAborted) and self.guard is not None:
                folder = getattr(self._args, "output_dir", None)
                self.guard.components.call(
                    "hf resume", earlier_checkpoints_advice, self.guard, self._started_at, folder, _CHECKPOINT_NAME
                )
            self._finish(exc)
            raise
        if decision.action == "rollback" and self._schedule is not None and self.guard is not None:
            self.guard.components.call("hf schedule", self._schedule.rolled_back, decision)
        if not self._ctc_told and self.guard is not None:
            self.guard.components.call("hf ctc", self._tell_impossible_alignment, decision)
        return None

    def _leave_clipping_to(self, trainer: Any, name: str) -> None:
        """The Trainer's class overrides ``_clip_grad_norm``: it keeps clipping (keel setting ``max_grad_norm`` to 0
        would bypass it), and keel takes the norm it returns, the norm before clipping, for its detectors."""
        assert self.guard is not None
        self._handoff.gate(trainer, "_clip_grad_norm", self._trainers_clipping)
        if self.take_over_clipping:
            say(
                self.guard,
                f"{name} overrides the Trainer's _clip_grad_norm: it keeps clipping (max_grad_norm="
                f"{self._args.max_grad_norm}), keel does not clip in its place, and detects on the norm it returns "
                "(before clipping)",
            )

    def _trainers_clipping(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's (overridden) ``_clip_grad_norm``: its return value is the update's norm before clipping (what
        the Trainer logs as ``grad_norm``), when it is one real number."""
        norm = original(*args, **kwargs)
        try:
            check_loss(norm, "grad_norm")
        except ValueError:
            norm = None  # keel then measures the gradients as the override left them
        self._norm_before_clip = norm
        return norm

    def _keep_in_the_checkpoint(self) -> None:
        """Keep what rollbacks raised ``max_steps`` by, keel's history a resume needs and the detectors' baselines
        (`keel.integrations._carried`: the LR back-off and clip in force, the escalation's counts) in the
        TrainerState's ``stateful_callbacks`` under ``"keel"``, saved in every checkpoint's ``trainer_state.json``: a
        resumed ``train()`` recomputes ``max_steps`` from its arguments and would stop short (reviewer V's V4), and its
        new Guard would train at the full LR again, its detectors blind to damage done before the checkpoint. Not as
        an ``ExportableState``: the Trainer's restore of those (``restore_callback_states_from_checkpoint``) replaces
        the user's callback by one built from JSON."""
        assert self._schedule is not None and self.guard is not None
        kept = getattr(self._schedule.run, "stateful_callbacks", None)
        if isinstance(kept, dict):
            kept[_CHECKPOINT_KEY] = {
                "run_id": self.guard.run_dir.run_id,  # a resume from this checkpoint continues this run's store
                "extended_by": self._schedule.extended_by,
                "history": kept_history(self.guard),
                "baselines": kept_baselines(self.guard),
            }

    def _carry_from_the_checkpoint(self, state: Any) -> None:
        """A ``train()`` resumed from a checkpoint: raise ``max_steps`` again by what the checkpoint's run had
        extended it by, and put keel's history and its detectors' baselines back (`_keep_in_the_checkpoint`); the
        extension and the actions in force are said."""
        assert self._schedule is not None and self.guard is not None
        kept = getattr(state, "stateful_callbacks", None)
        entry = kept.get(_CHECKPOINT_KEY) if isinstance(kept, dict) else None
        if isinstance(entry, dict):
            self._schedule.resumed(entry.get("extended_by", 0))
            if "history" in entry and not self.guard.resumed:
                history, step = entry["history"], state.global_step
                self.guard.components.call("hf resume", restore_history, self.guard, history, step)
            if "baselines" in entry and not self.guard.resumed:
                self.guard.components.call("hf resume baselines", restore_baselines, self.guard, entry["baselines"])
            self._keep_in_the_checkpoint()

    def _tell_impossible_alignment(self, decision: Decision) -> None:
        """Say once what an infinite CTC loss means (`_impossible_alignment`)."""
        hint = _impossible_alignment(self._objects, decision)
        if hint is not None and self.guard is not None:
            self._ctc_told = True
            say(self.guard, hint)

    def _scheduled_lr(self) -> list[float] | None:
        """The learning rates of the update about to be made (None without a scheduler keel steps): the scheduler's,
        times keel's LR back-off in force (the Trainer logged the scheduler's alone, 10× the LR applied after a
        rollback's ×0.1)."""
        if not self._shows_update_lr or self.guard is None:
            return None
        try:
            with self._handoff.acting_for_keel():
                lrs = list(self._objects["scheduler"].get_last_lr())
            scales = self.guard.actuator.lr_scales(self.guard.global_step)
            return [lr * s for lr, s in zip(lrs, scales, strict=True)] if len(scales) == len(lrs) else lrs
        except Exception:  # keel's bookkeeping never stops training: the Trainer then reads the scheduler as it is
            return None

    def _trainers_scheduler_step(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``lr_scheduler.step()``, after it read the update's learning rate for its log: from here on
        ``get_last_lr()`` answers the scheduler as it is, as without keel, also to callbacks listed before
        KeelCallback (reviewer V's V10: cleared at KeelCallback's ``on_step_end``, they read the finished update's).
        The call itself does nothing when `Guard` stepped the scheduler for this update."""
        self._update_lr = None
        return None if self._handoff.handled else original(*args, **kwargs)

    def _learning_rate_of_the_update(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """The scheduler's ``get_last_lr()`` as the Trainer reads it for its log, between ``optimizer.step()`` and
        ``lr_scheduler.step()``: the learning rates of the update just made, as without keel — `Guard.step` has
        already stepped the scheduler to the next update's (the log showed each step's LR one step early)."""
        return list(self._update_lr) if self._update_lr is not None else original(*args, **kwargs)

    def _step_guard(self, loss: Tensor, grad_norm: Tensor | float | None = None) -> Decision:
        """``Guard.step`` for this update (``grad_norm``: what an overridden ``_clip_grad_norm`` returned); the TRL
        adapter adds the trainer's statistics and its rollback hook."""
        assert self.guard is not None
        return self.guard.step(loss, grad_norm=grad_norm)

    def _check_new_run(self) -> None:
        """Refuse a second ``train()`` into the run_dir of the first one, before anything is changed: each
        ``train()`` is one keel run (the Trainer starts its steps, schedule and state over), and the first one's
        store is closed and kept."""
        if self.run_dir is None or str(self.run_dir) not in self._runs:
            return
        if self.guard_kwargs.get("resume") or self.guard_kwargs.get("overwrite"):
            return  # said what to do with the earlier run: the Guard continues or replaces it
        raise ValueError(
            f"KeelCallback: a second trainer.train() with the same callback and run_dir={str(self.run_dir)!r}, "
            "which holds the first train()'s run (kept as it is); allowed: set callback.run_dir to a new folder "
            "before this train() (each train() is one keel run), or build the callback with overwrite=True "
            "(replace that run) or resume=True (continue it from its disk snapshots)"
        )

    def _restarted_after_out_of_memory(self, args: Any, state: Any) -> str | None:
        """With ``auto_find_batch_size`` the Trainer runs its loop again, with a smaller batch, after an out-of-memory:
        a second ``on_train_begin`` in the same ``train()``, this callback's attempt never ended. Its Guard is closed
        quietly and the run starts over in the same run_dir (what is said about it returned); None for any other
        begin (a new ``train()``, or one after an interrupt, keeps the batch size)."""
        batch = getattr(state, "train_batch_size", None)
        if not (getattr(args, "auto_find_batch_size", False) and self in _OPEN and self._batch_size and batch):
            return None
        if batch >= self._batch_size:
            return None
        with console.silenced():  # no "run failed" summary: the run goes on
            self._finish(RuntimeError(f"the Trainer restarted its loop with batch size {batch} after an out-of-memory"))
        if self._runs and self._runs[-1] == str(self.run_dir):
            self._runs.pop()  # the same run, started over
        return (
            f"the Trainer restarted its loop with batch size {batch} after an out-of-memory (auto_find_batch_size): "
            "keel starts its run over"
        )

    def _first_update(self, *, with_loss: bool) -> None:
        """At the first update: with no loss in the model's output nor a backward of one, and the probes left to
        keel, the loss probe is dropped (it would record the placeholder) and the user told once; keel watches the
        gradients only."""
        assert self.guard is not None
        if with_loss or "probes" in self.guard_kwargs:
            return
        self._warn(
            "KeelCallback saw no loss in the model's output nor a backward of one (a custom training_step?): keel "
            "watches the gradients only. Call callback.record_loss(loss) each micro-batch to let it see the loss."
        )
        if any(p.name == "loss" for p in self.guard.probes):
            self.guard.remove_probe("loss")

    def _continues_the_run(self, args: Any, state: Any) -> int | None:
        """The step this ``train()``'s keel run continues the run in run_dir from, rather than refusing it as "a
        previous run" — or deleting it under ``overwrite=True``, which left a preempted job's store holding its
        last segment only (reviewer R's R8); None: no continuation (``resume=True`` keeps its meaning,
        `_refuse_two_resumes`).

        - The Trainer resumed from a checkpoint at step K whose keel entry (``trainer_state.json``) names the run id
          of the store in run_dir: K (the store drops its rows from K on: the Trainer does those steps again).
        - The Trainer starts at step 0 and the store is an unfinished run of this ``output_dir`` (a job killed before
          its first checkpoint, started again with the same command): 0 (its rows are all dropped, its id kept).

        Raises:
            ValueError: The checkpoint was written by a keel run and the store in run_dir holds another one.
        """
        kept = getattr(state, "stateful_callbacks", None)
        entry = kept.get(_CHECKPOINT_KEY) if isinstance(kept, dict) else None
        return continued_step(
            self.run_dir,
            step=getattr(state, "global_step", 0),
            written_by=entry.get("run_id") if isinstance(entry, dict) else None,
            job_folder=getattr(args, "output_dir", None),
            resume=bool(self.guard_kwargs.get("resume")),
            resumed_by="trainer.train(resume_from_checkpoint=...)",
        )

    def _build_guard(self, *, restarted: bool = False, continue_at: int | None = None) -> Guard:
        kwargs = dict(self.guard_kwargs)
        if restarted and self.run_dir is not None and not kwargs.get("resume"):
            kwargs["overwrite"] = True  # the aborted attempt's store, replaced by the same run started over
        if continue_at is not None:
            kwargs.pop("overwrite", None)  # the checkpoint is this run's: its history is kept, not deleted
            kwargs["continue_at"] = continue_at
        o = self._objects
        config = kwargs.pop("config", None) or {"trainer": "transformers.Trainer", "args": _json_args(self._args)}
        return Guard(
            o["model"],
            o["optimizer"],
            o["scheduler"],
            scaler=o["scaler"],
            run_dir=self.run_dir,
            policy=self.policy,
            max_grad_norm=self._clip,
            steps_scheduler=o["scheduler"] is None or not step_needs_an_argument(o["scheduler"]),
            config=config,
            seed=kwargs.pop("seed", getattr(self._args, "seed", None)),
            **kwargs,
        )

    def _missing_loss(self) -> Tensor:
        self._warn("KeelCallback: no loss for this step; keel reuses the last one (gradients are still checked).")
        return self._last_loss if self._last_loss is not None else torch.zeros(())

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, KeelWarning, stacklevel=3)

    def _refuse_two_resumes(self, trainer_step: int) -> None:
        """The Trainer resumed from its checkpoint and keel from its snapshot: keel's restore would replace the
        checkpoint's state (a 40-step run made 45 updates, batches trained twice, keel's steps 5 ahead)."""
        assert self.guard is not None
        keel_step = self.guard.global_step
        self._finish()
        raise ValueError(
            f"KeelCallback(resume=True) with trainer.train(resume_from_checkpoint=...): the Trainer resumed from "
            f"its checkpoint at step {trainer_step} and keel from its snapshot at step {keel_step}, and keel's "
            "restore would replace the checkpoint's state; allowed: one of them — resume_from_checkpoint "
            "without resume=True (keel continues its run in this run_dir from the checkpoint's step), or keel's "
            "resume=True without resume_from_checkpoint"
        )

    def _finish(self, exc: BaseException | None = None) -> None:
        _OPEN.discard(self)
        self._training = False
        self._shows_update_lr, self._update_lr = False, None
        self._handoff.restore()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._clip is not None and self._args is not None:
            self._args.max_grad_norm, self._clip = self._clip, None
        if self.guard is not None:  # records "finished", "aborted" or the failure; a second call does nothing
            self.guard.__exit__(type(exc) if exc is not None else None, exc, None)


_CHECKPOINT_NAME = r"^checkpoint-(\d+)$"  # the Trainer's checkpoint folders, their step as group 1
_CHECKPOINT_KEY = "keel"  # keel's entry in a checkpoint's trainer_state.json "stateful_callbacks"
_OPEN: weakref.WeakSet[KeelCallback] = weakref.WeakSet()  # callbacks between on_train_begin and their end


def _close_interrupted(starting: KeelCallback) -> None:
    """Close the Guard of every callback whose ``train()`` ended without ``on_train_end`` — an exception, Ctrl-C in a
    notebook: the Trainer has no event for it — before another ``train()`` in this process begins. Left open, its
    run_dir stayed locked, its store "running", and ``Tensor.backward``/``optimizer.step`` gated (reviewer V18)."""
    for callback in list(_OPEN):
        warnings.warn(
            f"KeelCallback: the train() with run_dir={str(callback.run_dir)!r} ended without on_train_end (an "
            "exception or an interrupt); its Guard is closed now, before this train() begins",
            KeelWarning,
            stacklevel=4,
        )
        callback._finish(RuntimeError("train() ended without on_train_end (an exception or an interrupt)"))


def _trainer_calling(callback: KeelCallback) -> Any:
    """The Trainer whose callback handler holds ``callback``, found on the call stack of the event being delivered
    (the Trainer does not pass itself to its callbacks); None when the event came from elsewhere."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if any(c is callback for c in getattr(getattr(owner, "callback_handler", None), "callbacks", ())):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def _trainer_starts_over(step: int, max_steps: object) -> str:
    """What a first ``train()`` whose keel run resumed past step 0 does: the Trainer itself starts at step 0."""
    planned = f"its {max_steps} steps" if isinstance(max_steps, int) and max_steps > 0 else "its whole schedule"
    return (
        f"keel resumed its run at step {step} from its snapshots (resume=True), but the Trainer starts at step 0: it "
        f"trains {planned} again on top of that state, from its first batch and with its LR schedule restarted. To "
        "continue a killed run, resume the Trainer from its own checkpoint (trainer.train(resume_from_checkpoint=...)) "
        "with this run_dir and without resume=True: keel continues its run there from the checkpoint's step (keel's "
        "actions and baselines travel in the checkpoint)"
    )


def _overrides_clipping(trainer: Any) -> str | None:
    """The name of ``trainer``'s class when it overrides the Trainer's ``_clip_grad_norm`` (on the class or the
    instance), else None (also for a transformers whose Trainer clips inline, without that method)."""
    from transformers import Trainer

    base = getattr(Trainer, "_clip_grad_norm", None)
    own = getattr(trainer, "_clip_grad_norm", None)
    if trainer is None or base is None or own is None or getattr(own, "__func__", own) is base:
        return None
    return type(trainer).__name__


def _impossible_alignment(objects: dict[str, Any], decision: Decision) -> str | None:
    """What an infinite loss means on a CTC model that does not zero it (``ctc_zero_infinity=False``, the config's
    default): a label sequence longer than the frames the model outputs for its audio, which no alignment fits. keel's
    own advice for a non-finite loss (LR, fp16) does not apply; run_speech_recognition_ctc's flag does."""
    config = getattr(objects.get("model"), "config", None)
    if getattr(config, "ctc_zero_infinity", None) is not False:
        return None
    if not any(f.signal == keys.LOSS and f.value == math.inf for f in decision.findings):
        return None
    return (
        f"step {decision.step}: the CTC loss is inf — a label sequence longer than the frames the model outputs for "
        "its audio (an impossible alignment), not an unstable update. Set config.ctc_zero_infinity=True "
        "(run_speech_recognition_ctc's --ctc_zero_infinity) or leave out examples whose labels outnumber their frames"
    )


def _output_loss(output: Any, kwargs: dict) -> Tensor | None:
    """The loss in a model's output: ``output.loss`` / ``output["loss"]``, or the first element of a tuple when
    labels were passed (``return_dict=False``)."""
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output.get("loss") if hasattr(output, "get") else None
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output and kwargs.get("labels") is not None:
        loss = output[0]
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


# speed_metrics' figures, and the Trainer's own bookkeeping: not measures of the model
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "tokens_per_second", "model_preparation_time")


def _split_eval(metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The eval's name and its metrics without the Trainer's prefix: ``eval_loss`` → ("eval", {"loss": …}); with a
    dict ``eval_dataset`` the prefix is ``eval_<dataset>`` (found from its ``_runtime`` key) → (``<dataset>``, …)."""
    runtime = next((k for k in metrics if k.endswith("_runtime")), "eval_runtime")
    prefix = runtime[: -len("_runtime")] + "_"
    name = prefix[len("eval_") : -1].replace("/", "_") if prefix.startswith("eval_") and prefix != "eval_" else "eval"
    ours = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    return name, {k: v for k, v in ours.items() if k not in _NOT_METRICS}


def _json_args(args: Any) -> dict[str, Any]:
    try:
        return {
            k: v
            for k, v in args.to_dict().items()
            if isinstance(v, (str, int, float, bool, type(None)))
            and not (isinstance(v, float) and not math.isfinite(v))
        }
    except Exception:  # keel's bookkeeping never stops training
        return {}
