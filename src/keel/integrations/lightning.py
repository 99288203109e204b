"""Lightning adapter: `KeelCallback` puts a keel `Guard` in charge of a Lightning ``Trainer``'s updates.

    trainer = L.Trainer(max_steps=1000, callbacks=[KeelCallback(run_dir="runs/pl", policy="skip")])
    trainer.fit(module, datamodule)

How it fits Lightning's automatic optimization (Lightning ≥ 2.0):

- **loss**: each micro-batch's loss from ``on_before_backward`` (already divided by
  ``accumulate_grad_batches``, so their sum is the step's mean loss; under ``16-mixed`` divided back by the
  GradScaler's scale, on device). The short window Lightning steps at an epoch's end (k < N micro-batches, each
  divided by N all the same) is scaled by N/k: its mean loss too.
- **update**: the optimizer's ``step(closure)`` that Lightning's precision plugin calls first runs the closure
  (forward, backward, ``on_before_optimizer_step``), then goes to ``Guard.step``; under ``16-mixed`` the
  plugin's ``scaler.step`` goes to ``Guard.step`` and its ``scaler.update`` does nothing (`Guard` updated the
  scaler). The one step-interval LR scheduler is stepped by `Guard`, after applied updates only; Lightning's
  own call does nothing (`keel.integrations._handoff`). Epoch-interval schedulers stay Lightning's.
- **a rollback** restores the scheduler with the model while ``global_step`` goes on: keel raises ``max_steps`` by
  the updates undone, so the LR schedule reaches its end, and says so (``extend_after_rollback``,
  `keel.integrations._run_length`). The extension is kept in the callback's state in every checkpoint and applied
  again by a ``fit(ckpt_path=...)`` from it, with keel's actions in force (the LR back-off, the tightened clip) and
  its escalation counts (`keel.integrations._carried`), said on the console.
- **clipping**: with ``gradient_clip_val`` (norm algorithm) keel measures gradients before clipping and clips
  itself with the same value; under ``"observe"`` Lightning clips as usual (bit-identical training). A module that
  overrides ``configure_gradient_clipping`` (Lightning's hook: clip from some epoch on, per parameter group …)
  keeps its clipping and the ``gradient_clip_val`` it is given; keel detects on the norm the hook's
  ``torch.nn.utils.clip_grad_norm_`` returns (the norm before clipping), else on the gradients as the hook left them.
- **DDP**: the strategy's DDP module goes to `Guard`, so signals are all-reduced and each rank's own
  gradient is measured (`keel.guard.distributed`).
- **validation**: what the validation loop logged (the ``trainer.callback_metrics`` it set) goes to
  `Guard.record_eval` at the last update, as ``eval/val/<metric>``; keel follows the ``ModelCheckpoint``'s
  ``monitor`` and ``mode`` (default: a metric named ``…loss…``, lower is better; `keel.integrations._eval`).
  The sanity check's validation is not part of the run.

A ``training_step`` that returns ``None`` is Lightning's own skip: keel leaves that step to Lightning. Manual
optimization is refused (the module calls its optimizers itself): a ``keel.watch`` per model and optimizer, made in the
module's ``on_train_start``, guards it (`MANUAL_OPTIMIZATION` says how).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from keel._core.errors import KeelWarning, TrainingAborted
from keel.guard import Guard
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
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError:  # the standalone `pytorch_lightning` package has the same API
    try:
        from pytorch_lightning import Callback  # type: ignore[no-redef,assignment]
        from pytorch_lightning.utilities.model_helpers import is_overridden  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("keel.integrations.lightning needs Lightning: pip install 'keel[lightning]'") from exc


class KeelCallback(Callback):
    """A Lightning ``Callback`` that runs a keel `Guard` inside ``Trainer.fit``.

    Args:
        run_dir: Directory of the run store (rank 0 writes it under DDP); ``None`` keeps it in memory.
        policy: ``"observe"``, ``"skip"`` or ``"recover"`` (see `Guard`).
        take_over_clipping: Measure before clipping and clip in keel with ``gradient_clip_val`` (norm
            algorithm). ``None``: yes, except under ``"observe"``.
        extend_after_rollback: After a rollback, raise the trainer's ``max_steps`` by the updates it undid (the
            snapshot's scheduler is restored with the model), so the LR schedule reaches its end; ``False`` keeps it
            (keel then says how short the schedule ends). A run bounded by ``max_epochs`` alone is not extended.
        **guard_kwargs: Any other `Guard` argument (``probes``, ``detectors``, ``recovery``, ``log_every`` …).

    Attributes:
        guard: The `Guard` (built when training starts).

    Raises:
        ValueError: A `Guard` argument the callback sets itself, manual optimization, or several optimizers.
    """

    def __init__(
        self,
        *,
        run_dir: str | None = None,
        policy: Policy = "observe",
        take_over_clipping: bool | None = None,
        extend_after_rollback: bool = True,
        **guard_kwargs: Any,
    ) -> None:
        self.take_over_clipping = takes_over_clipping(policy, take_over_clipping, guard_kwargs, run_dir)
        self.extend_after_rollback = checked_extend_after_rollback(extend_after_rollback)
        self._schedule: ScheduleAfterRollbacks | None = None
        self.run_dir, self.policy, self.guard_kwargs = run_dir, policy, guard_kwargs
        self.guard: Guard | None = None
        self._handoff = Handoff()
        self._loss = StepLoss()
        self._scaler: Any = None
        self._clip: float | None = None
        self._norm_before_clip: Tensor | None = None  # what the module's clipping hook's clip_grad_norm_ returned
        self._trainer: Any = None
        self._metrics_before: dict[str, Any] = {}  # callback_metrics when validation started
        self._extended_before = 0  # what a checkpoint's run had extended max_steps by (`load_state_dict`)
        self._history_before: dict[str, Any] | None = None  # and keel's history it kept (`keel.integrations._carried`)
        self._baselines_before: dict[str, Any] | None = None  # and the detectors' baselines
        self._started_at = 0  # the trainer's step this run started from (ckpt_path), else 0
        self._run_id_before: object = None  # the keel run that wrote the checkpoint (`load_state_dict`)

    # --- Lightning's events -------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(MANUAL_OPTIMIZATION)
        if len(trainer.optimizers) != 1:
            raise ValueError(f"KeelCallback with {len(trainer.optimizers)} optimizers; allowed: exactly one")
        optimizer = trainer.optimizers[0]
        scheduler = self._own_scheduler(trainer)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._trainer = trainer
        self._take_over_clipping(trainer, pl_module)
        kwargs = dict(self.guard_kwargs)
        config = kwargs.pop("config", None) or {
            "trainer": "lightning.Trainer",
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "max_steps": trainer.max_steps,
            "default_root_dir": str(trainer.default_root_dir),  # the job's folder (`continued_step`)
        }
        continues = continued_step(
            self.run_dir,
            step=trainer.global_step,
            written_by=self._run_id_before,
            job_folder=str(trainer.default_root_dir),
            resume=bool(kwargs.get("resume")),
            resumed_by="trainer.fit(ckpt_path=...)",
        )
        if continues is not None:
            kwargs.pop("overwrite", None)  # the checkpoint is this run's: its history is kept, not deleted
            kwargs["continue_at"] = continues
        self.guard = Guard(
            trainer.strategy.model,
            optimizer,
            scheduler,
            scaler=self._scaler,
            run_dir=self.run_dir,
            policy=self.policy,
            max_grad_norm=self._clip,
            config=config,
            **kwargs,
        )
        if continues is not None:
            say(self.guard, continued_line(self.guard.run_dir.run_id, str(self.run_dir), continues))
        self._started_at = continues or 0
        if trainer.global_step and not self.guard.global_step and not self.guard.resumed:
            self.guard.start_at(trainer.global_step)  # ckpt_path: keel's steps are the trainer's
            self._started_at = trainer.global_step
        self._schedule = ScheduleAfterRollbacks(
            self.guard, _LightningRun(trainer), extend=self.extend_after_rollback, meta_key="lightning"
        )
        if trainer.global_step and self._extended_before:  # ckpt_path: the checkpoint's run had been extended
            self.guard.components.call("lightning schedule", self._schedule.resumed, self._extended_before)
        if trainer.global_step and self._history_before is not None and not self.guard.resumed:
            history, step = self._history_before, trainer.global_step  # ckpt_path: keel's LR back-off, clip, ladder
            self.guard.components.call("lightning resume", restore_history, self.guard, history, step)
        if trainer.global_step and self._baselines_before is not None and not self.guard.resumed:
            baselines = self._baselines_before
            self.guard.components.call("lightning resume baselines", restore_baselines, self.guard, baselines)
        self._extended_before, self._history_before, self._baselines_before = 0, None, None
        self._run_id_before = None
        if self._scaler is not None:  # the plugin runs the closure, then scaler.step(optimizer), scaler.update()
            self._handoff.gate(self._scaler, "step", self._scaler_step)
            self._handoff.gate(self._scaler, "update", self._scaler_update)
        else:  # the plugin calls optimizer.step(closure=...)
            self._handoff.gate(optimizer, "step", self._optimizer_step)
        if scheduler is not None:
            self._handoff.gate_scheduler(scheduler)

    def _take_over_clipping(self, trainer: Any, pl_module: Any) -> None:
        """Clip in keel with ``gradient_clip_val`` (norm algorithm), unless the module clips in its own
        ``configure_gradient_clipping``: that hook keeps the value, and keel keeps the norm it clips with."""
        if is_overridden("configure_gradient_clipping", pl_module):  # reviewer V's V13: it got None, keel clipped
            self._handoff.gate(torch.nn.utils, "clip_grad_norm_", self._hooks_clipping)
            return
        algorithm = trainer.gradient_clip_algorithm  # None means Lightning's default, the norm
        if self.take_over_clipping and trainer.gradient_clip_val and (algorithm is None or algorithm == "norm"):
            self._clip, trainer.gradient_clip_val = float(trainer.gradient_clip_val), None

    def _hooks_clipping(self, original: Any, parameters: Any, *args: Any, **kwargs: Any) -> Any:
        """The hook's ``clip_grad_norm_``: its norm is the update's when it clipped every trainable parameter at once
        (a call per parameter group gives each group's norm: keel then measures the clipped gradients itself)."""
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        norm = original(params, *args, **kwargs)
        trainable = {id(p) for p in self._trainer.lightning_module.parameters() if p.requires_grad}
        if self._norm_before_clip is None and isinstance(norm, Tensor) and trainable <= {id(p) for p in params}:
            self._norm_before_clip = norm  # a second call sees clipped gradients: the first call's norm stays
        return norm

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        scale = getattr(self._scaler, "_scale", None) if self._scaler is not None else None
        self._loss.add(loss / scale if scale is not None else loss, share=True)  # shares: normalized per micro-batch

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._metrics_before = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.guard is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return  # the sanity check before training, or trainer.validate(): not part of the run
        # the validation loop replaces the entries it logged; what training logged stays the same object
        logged = {k: v for k, v in trainer.callback_metrics.items() if self._metrics_before.get(k) is not v}
        self.guard.components.call("lightning eval", self._record_eval, trainer, logged)

    def _record_eval(self, trainer: Any, logged: dict[str, Any]) -> None:
        assert self.guard is not None
        checkpoint = trainer.checkpoint_callback
        monitor = getattr(checkpoint, "monitor", None)
        greater = None if monitor is None else getattr(checkpoint, "mode", "min") == "max"
        chosen = eval_metrics(logged, follow=monitor, greater_is_better=greater)
        if chosen is not None:
            self.guard.record_eval(chosen[0], name="val", goal=chosen[1])

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._schedule is not None and self.guard is not None:
            stopped = bool(trainer.should_stop)  # a callback's (EarlyStopping, a time budget), not max_steps'
            self.guard.components.call("lightning schedule", self._schedule.at_the_end, stopped)
        self._finish(None)

    def state_dict(self) -> dict[str, Any]:
        """What rollbacks raised ``max_steps`` by, keel's history a resume needs (the LR back-off and clip in force,
        the escalation's counts) and the detectors' baselines (`keel.integrations._carried`), kept in the trainer's
        checkpoints: a ``fit(ckpt_path=...)`` starts from the trainer's own ``max_steps`` and would stop short of the
        schedule's end (reviewer V's V4), and its new Guard would train at the full LR again, its detectors blind to
        damage done before the checkpoint."""
        if self._schedule is None or self.guard is None:
            return {
                "extended_by": self._extended_before,
                "history": self._history_before,
                "baselines": self._baselines_before,
                "run_id": self._run_id_before,
            }
        writer = self.guard.recorder.writer
        if writer is not None:  # a checkpoint must not cover steps the store has not committed (`continued_step`)
            self.guard.components.call("lightning checkpoint", writer.flush)
        history = self.guard.components.call("lightning checkpoint", kept_history, self.guard)
        baselines = self.guard.components.call("lightning checkpoint", kept_baselines, self.guard)
        return {
            "extended_by": self._schedule.extended_by,
            "history": history,
            "baselines": baselines,
            "run_id": self.guard.run_dir.run_id,  # a fit(ckpt_path=) from this checkpoint continues this run's store
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored from a checkpoint before training starts; applied again in ``on_train_start``."""
        extended, history, baselines = (state_dict.get(k) for k in ("extended_by", "history", "baselines"))
        self._extended_before = extended if isinstance(extended, int) and extended > 0 else 0
        self._history_before = history if isinstance(history, dict) else None
        self._baselines_before = baselines if isinstance(baselines, dict) else None
        self._run_id_before = state_dict.get("run_id")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, TrainingAborted) and self.guard is not None:
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
            self.guard.components.call(
                "lightning resume", earlier_checkpoints_advice, self.guard, self._started_at, folder, _CHECKPOINT_NAME
            )
        self._finish(exception)

    # --- the update ---------------------------------------------------------------------------------
    def _optimizer_step(self, original: Any, closure: Any = None, **kwargs: Any) -> Any:
        result = closure() if closure is not None else None  # forward, backward, on_before_optimizer_step
        if len(self._loss) == 0:  # training_step returned None: Lightning's own skip, as without keel
            self._handoff.handled, self._norm_before_clip = False, None
            return original(closure=lambda: result, **kwargs)
        self._guard_step()
        return result

    def _scaler_step(self, original: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if len(self._loss) == 0:
            self._handoff.handled, self._norm_before_clip = False, None
            return original(optimizer, *args, **kwargs)
        self._guard_step()
        return None

    def _scaler_update(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        return None if self._handoff.handled else original(*args, **kwargs)

    def _guard_step(self) -> None:
        loss, norm, self._norm_before_clip = self._window_mean(), self._norm_before_clip, None
        assert self.guard is not None and loss is not None
        self._handoff.handled = True
        with self._handoff.acting_for_keel():
            decision = self.guard.step(loss, grad_norm=norm)
        if decision.action == "rollback" and self._schedule is not None:
            self.guard.components.call("lightning schedule", self._schedule.rolled_back, decision)

    # --- helpers ------------------------------------------------------------------------------------
    def _window_mean(self) -> Tensor | None:
        """The step's mean loss: Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` also in the
        short window at an epoch's end (reviewer V's V12: recorded at k/N of its loss)."""
        seen, planned = len(self._loss), int(self._trainer.accumulate_grad_batches)
        loss = self._loss.take()
        return loss * (planned / seen) if loss is not None and 0 < seen < planned else loss

    def _own_scheduler(self, trainer: Any) -> Any:
        """The step-interval scheduler Guard steps (after applied updates only); others stay Lightning's."""
        configs = trainer.lr_scheduler_configs
        owned = [c for c in configs if c.interval == "step" and c.frequency == 1 and not c.reduce_on_plateau]
        if len(configs) > len(owned[:1]):
            warnings.warn(
                f"KeelCallback: {len(configs) - len(owned[:1])} LR scheduler(s) (epoch interval, frequency "
                "> 1, plateau, or more than one) stay Lightning's: they advance on skipped steps and a "
                "rollback does not restore them",
                KeelWarning,
                stacklevel=2,
            )
        return owned[0].scheduler if owned else None

    def _finish(self, exc: BaseException | None) -> None:
        self._handoff.restore()
        if self._clip is not None and self._trainer is not None:
            self._trainer.gradient_clip_val, self._clip = self._clip, None
        if self.guard is not None:  # records "finished", "aborted" or the failure; a second call does nothing
            self.guard.__exit__(type(exc) if exc is not None else None, exc, None)


_CHECKPOINT_NAME = r"step=(\d+)"  # ModelCheckpoint's default file names (epoch=0-step=10.ckpt), their step as group 1
MANUAL_OPTIMIZATION = (
    "KeelCallback with automatic_optimization=False: not supported (the module steps its optimizers itself, one "
    "update per optimizer, and KeelCallback guards one); allowed: automatic optimization, or, keeping the module as "
    "it is, no KeelCallback and a keel.watch per model and optimizer made in the module's on_train_start — a GAN: "
    "opt_g, opt_d = self.optimizers(); self.watches = [keel.watch(self.D, opt_d.optimizer, policy=..., "
    "detectors=adversarial_detectors()), keel.watch(self.G, opt_g.optimizer, policy=..., "
    "detectors=adversarial_detectors())] (from keel.integrations.watch import adversarial_detectors: an adversarial "
    "loss is no measure of fit), and w.close() for each in on_train_end"
)


class _LightningRun:
    """A Lightning trainer's step count and step limit, as `ScheduleAfterRollbacks` reads and extends them (its epoch
    loop reads ``max_steps`` at every step)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    @property
    def global_step(self) -> int:
        return int(self.trainer.global_step)

    @property
    def max_steps(self) -> int:
        return int(self.trainer.fit_loop.epoch_loop.max_steps)

    @max_steps.setter
    def max_steps(self, steps: int) -> None:
        self.trainer.fit_loop.epoch_loop.max_steps = steps
