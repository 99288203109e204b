"""Guard: the one object a training loop talks to. Orders signals → detect → recover each step.

    guard = keel.Guard(model, optimizer, scheduler=scheduler, run_dir="runs/exp1", policy="recover")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        decision = guard.step(loss)   # measure → decide → optimizer.step()/scheduler.step(), skip or roll back
        optimizer.zero_grad(set_to_none=True)
    guard.close()

The declared order inside `Guard.step`: unscale (GradScaler) → measure (probes, one host copy) → detect →
decide → act (fence snapshot → clip → step, or skip, or roll back) → after-step probes → snapshot → record.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter
from typing import Any, Literal

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.decision import Decision
from keel._core.errors import GuardClosed, KeelWarning, TrainingAborted
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import refuse_closure_only
from keel.detect import Detector, default_detectors
from keel.detect._finding import skip_mends
from keel.guard.components import Components
from keel.guard.data_ledger import SPIKE_KINDS, DataLedger
from keel.guard.deferred import DeferredSteps
from keel.guard.distributed import DistributedConfig, RankSync
from keel.guard.environment import describe_environment
from keel.guard.evaluation import EvalSpec, Evaluation, Goal
from keel.guard.fabric import fabric_scaler_of, fabric_wrapped
from keel.guard.host_side import compile_ready, host_side
from keel.guard.optimizers import Optimizers
from keel.guard.options import check_arguments, check_loss, check_probes, check_run_dir, is_step
from keel.guard.rank_outlier import RankOutlierConfig, RankOutlierDetector
from keel.guard.recorder import Recorder
from keel.guard.resumed_scheduler import HeldScheduler
from keel.guard.resumed_settings import ResumedSettings, optimizer_settings
from keel.guard.run_dir import RunDir
from keel.guard.run_end import RunEnd
from keel.guard.user_signals import split_signals
from keel.guard.weights_check import broken_update_finding, non_finite_parameters, update_proven_finite
from keel.recover import Actuator, Escalation, EscalationConfig, Policy, Recovery, RecoveryConfig, TrainingState
from keel.recover.replay import StepReplay
from keel.recover.running_stats import RunningStats
from keel.recover.snapshot import Snapshot
from keel.recover.state import StartState, Stateful
from keel.signals import (
    DEFAULT_PROBES,
    FULL_PROBES,
    TRANSFORMER_PROBES,
    Measurements,
    Probe,
    StepContext,
    create_probe,
    pack,
    unpack,
)
from keel.signals.attribution import Attribution
from keel.signals.pack import HostValues
from keel.signals.param_norm import parameter_norms
from keel.store import StoreError

PROBE_SETS = {"default": DEFAULT_PROBES, "transformer": TRANSFORMER_PROBES, "full": FULL_PROBES}

_DTYPE = attrgetter("dtype")


class Guard(DeferredSteps):
    """Watches a training loop and applies, skips or rolls back each optimizer step.

    `Guard.step` calls ``optimizer.step()`` (through the GradScaler when one is given) and
    ``scheduler.step()`` itself unless it decides otherwise. With ``policy="observe"`` training is
    bit-identical to the bare loop. An error inside keel is recorded as a ``keel_error`` finding and never
    stops training: a probe or detector that raises, or returns something outside its contract, is switched off
    alone (``components.disabled``, also stored as the run's ``disabled`` meta) and the rest goes on protecting
    the run. A decision that changes training is always recorded with its reason.

    Args:
        model: The model being trained; its trainable parameters are the ones watched.
        optimizer: The optimizer to step; several (Muon + AdamW) as ``keel.Optimizers(adamw, muon)``, with their
            schedulers as ``keel.Schedulers(...)``.
        scheduler: An LR scheduler stepped after each applied update (not after skipped ones, except under
            ``observe``, which steps exactly like the bare loop); snapshots hold and restore its state.
        steps_scheduler: False: keel never steps the scheduler, only snapshots and restores it — for a
            scheduler the loop steps per epoch or with a metric (``ReduceLROnPlateau.step(val_loss)``); step it
            after an update only when ``decision.stepped``. `keel.watch` sets it.
        run_dir: Directory of the run store (``run_dir/run.sqlite``) and disk snapshots; ``None`` keeps
            everything in memory. It holds one run: a folder that holds an earlier run is refused unless
            ``resume`` or ``overwrite`` says what to do with it, and it is locked while the Guard is open.
        policy: ``"observe"`` never changes training; ``"skip"`` skips harmful updates; ``"recover"`` also
            rolls back to in-memory snapshots and applies the post-rollback actions, and checks the weights after
            an applied update keel cannot prove finite, the first one and each one a snapshot follows (one read,
            one host copy; ``RecoveryConfig(check_weights=...)``): an update that left NaN/Inf in them is rolled
            back in the same `step`, before the loop's next forward samples from them (`keel.guard.weights_check`;
            not with an enabled GradScaler, nor under ``sync="deferred"``).
        scaler: A ``torch.amp.GradScaler`` the loop uses; the loop calls ``scaler.scale(loss).backward()``
            and passes the unscaled ``loss`` to `step`.
        log_every: Cadence of the per-parameter signals (parameter norms, update ratios, per-tensor norms).
        probes: ``"default"`` (loss, gradient norm, parameter norm), ``"transformer"`` (adds attention
            logits and entropy, output logits, block RMS), ``"full"`` (adds update/parameter ratios, gradient-
            weight cosine, Adam ε-dominance) or a list of probe names or `Probe` objects.
        detectors: Detector objects; default: loss and gradient spikes, divergence, non-finite.
        max_grad_norm: Clip the global gradient norm to this value before the step (as
            ``clip_grad_norm_``), reusing the norm already measured; ``None`` does not clip.
        max_consecutive_skips: Skips in a row before the run rolls back (recover) or aborts (skip).
        recovery: Snapshot and rollback settings (`RecoveryConfig`, with the cap on rollbacks in a window); used by
            ``policy="recover"`` and ``resume``. Set ``disk_every`` to also write snapshots to ``run_dir/snapshots``.
        resume: Continue from the newest good disk snapshot in ``run_dir`` (model, optimizer, scheduler,
            scaler, detectors and RNG now, the data position at `track`); `global_step` says where to carry
            on. Create the guard where the interrupted run created it, so later random draws line up. Only
            that run's own snapshots are loaded, and only into the same setup (model parameters, optimizer
            class and groups, scheduler): a different one is refused, saying what differs. A ``run_dir``
            that holds no run yet starts a new one.
        overwrite: Start a new run in a ``run_dir`` that holds an earlier one, deleting keel's files there
            first (``run.sqlite``, ``snapshots/``, ``rank-<r>/snapshots/``, ``export/``).
        continue_at: The loop restored the state of this step itself (a trainer's own checkpoint: the HF Trainer's
            ``resume_from_checkpoint``, Lightning's ``ckpt_path``): continue the run ``run_dir`` holds from there —
            its run id kept, its store's rows of this step on dropped (the loop does them again), its disk
            snapshots past it deleted, none loaded; `global_step` starts here. A ``run_dir`` that holds no run
            starts a new one at this step (as `start_at`). Not with ``resume`` or ``overwrite``.
        config: The run's own configuration, stored with the run (JSON-able).
        seed: The run's seed, stored with the run.
        distributed: Under ``torch.distributed`` with several ranks (``None``: detected), signals are
            all-reduced before each decision so every rank skips or rolls back together; rank 0 writes the
            run store, each rank keeps its snapshots under ``run_dir/rank-<r>``, and a `RankOutlierDetector`
            names a faulty rank. ``False`` keeps each rank on its own; a `DistributedConfig` tunes it.
        sync: ``"step"`` reads each step's signals to the host and decides before its update (one host sync per
            step; under ``"recover"`` a second after an update keel cannot prove finite, the weights check:
            `RecoveryConfig` ``check_weights``); ``"deferred"`` reads nothing
            before the update — the skip verdict is computed on the device and applied through the optimizer's
            ``found_inf``, everything else is decided one step later. For
            GPUs, where a sync per step stalls the launch queue; see `keel.guard.deferred` for what lags and
            why that is safe. Needs ``fused=True`` Adam/AdamW/SGD unless ``policy="observe"``.
        attribution: Attribute bad steps to the examples of their batch (`keel.Attribution`: a per-example loss
            function): on a step with a spike, a non-finite value or a critical finding, each example's loss is
            measured from the state before the update and the top offenders join the finding's evidence; under
            ``skip``/``recover`` the outliers go to ``run_dir/skip_list.json`` (`keel.data.SkipListSampler`
            honours it). Needs ``batch=`` at `step`; see `keel.guard.data_ledger`.
        flush_on_exit: With a ``run_dir``, when the process ends before `close` — SIGTERM (preemption), SIGINT
            (Ctrl-C), an uncaught exception, ``sys.exit`` — flush the store and record how and after how many steps
            the run ended (``status``). Installs SIGTERM/SIGINT handlers (main thread only) that pass each signal on
            to the handler installed before, so the process ends as it would without keel; put back at `close`.
            ``False`` installs nothing. See `keel.guard.run_end`.

    Raises:
        ValueError: An unknown policy or probe, a model without trainable parameters, a bad cadence; a
            ``run_dir`` that holds another run (without ``resume`` or ``overwrite``) or that another open Guard
            holds; a ``resume`` into a setup that differs from the snapshot's.

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
        max_consecutive_skips: int = 10,
        recovery: RecoveryConfig | None = None,
        resume: bool = False,
        overwrite: bool = False,
        continue_at: int | None = None,
        config: dict[str, Any] | None = None,
        seed: int | None = None,
        distributed: DistributedConfig | bool | None = None,
        sync: Literal["step", "deferred"] = "step",
        attribution: Attribution | None = None,
        flush_on_exit: bool = True,
        steps_scheduler: bool = True,
    ) -> None:
        # Lightning Fabric's optimizer (fabric.setup's) is taken as the one it wraps, with its 16-mixed GradScaler,
        # which scaled the loss in fabric.backward: on the wrapper keel measured and clipped the scaled gradients
        # (max_grad_norm=1.0 made SGD's updates 1/1024 as large)
        scaler = scaler if scaler is not None else fabric_scaler_of([optimizer])
        optimizer = fabric_wrapped(optimizer)
        self.named = _trainable_parameters(model, optimizer)
        self._names, self._params = tuple(n for n, _ in self.named), [p for _, p in self.named]
        check_arguments(
            dict(
                policy=policy,
                scheduler=scheduler,
                scaler=scaler,
                run_dir=run_dir,
                log_every=log_every,
                probes=probes,
                max_grad_norm=max_grad_norm,
                max_consecutive_skips=max_consecutive_skips,
                detectors=detectors,
                recovery=recovery,
                resume=resume,
                overwrite=overwrite,
                continue_at=continue_at,
                config=config,
                seed=seed,
                distributed=distributed,
                sync=sync,
                attribution=attribution,
                flush_on_exit=flush_on_exit,
                steps_scheduler=steps_scheduler,
            )
        )
        if resume and run_dir is None:
            raise ValueError("resume=True needs run_dir; allowed: the run_dir of the run to continue")
        if resume and recovery is None:
            recovery = RecoveryConfig(disk_every=1)
        rollbacks = recovery or RecoveryConfig()
        self.escalation = Escalation(
            EscalationConfig(
                policy=policy,
                max_consecutive_skips=max_consecutive_skips,
                max_rollbacks=rollbacks.max_rollbacks,
                rollback_window=rollbacks.rollback_window,
            )
        )
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        compile_ready()  # a model compiled before this line: step's compiler.disable is made now, not in a trace
        self.policy, self.log_every, self.sync = policy, log_every, sync
        self.probes = _build_probes(probes)
        run_dir = check_run_dir(run_dir)  # last of the checks: it creates the folder
        self.dist = RankSync.create(model, distributed)  # None in a single process: nothing changes there
        # Locked until close. Rank 0 writes the store; snapshots are per rank (run_dir/rank-<r>).
        continues = continue_at is not None
        self.run_dir = RunDir.claim(run_dir, resume=resume or continues, overwrite=overwrite, sync=self.dist)
        self.state = TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        self.state.history["escalation"] = self.escalation  # survives rollbacks: it counts them
        self._set_up_components(detectors)
        wants_recovery = policy == "recover" or resume or recovery is not None
        self.recovery = (
            Recovery(self.state, rollbacks, self.run_dir.snapshot_dir, run_id=self.run_dir.run_id)
            if wants_recovery
            else None
        )
        self.actuator = Actuator(
            self.state, observe=policy == "observe", max_grad_norm=max_grad_norm, recovery=self.recovery
        )
        self.actuator.steps_scheduler = steps_scheduler
        if self.recovery is not None:
            self.recovery.loop_steps_scheduler = not steps_scheduler
        if sync == "deferred":
            try:
                self._init_deferred()
            except ValueError:
                self.run_dir.release()
                raise
        self.global_step = 0
        self._late: Measurements = {}  # after-step measurements of the previous step, sent with this one
        self._late_step = -1
        self._norm_before_clip: Tensor | None = None
        self._signals: tuple[Measurements, dict[str, float]] = ({}, {})  # the loop's own, this step
        self._last_call: float | None = None
        self._closed = False
        self._snapshots_recorded = 0
        try:
            self.recorder = Recorder(self.run_dir.store_dir, log_every)
        except StoreError:  # a store a newer keel wrote, or one a full disk cannot open: refused, the run_dir freed
            self.run_dir.release()
            raise
        if self.recovery is not None and self.recovery.disk is not None and self.recorder.writer is not None:
            # a disk snapshot appears only once the store holds every step before it: a process killed at any
            # moment leaves nothing a resume must call lost (the store commits every 0.5 s, a snapshot at once)
            self.recovery.disk.before_publish = self.recorder.writer.flush
        self.evaluation = Evaluation(model, self.components, self.recorder)
        self.state.history["evaluation"] = self.evaluation  # phases and evals so far: a rollback keeps them
        writes_skips = policy != "observe" and self.run_dir.store_dir is not None  # observe changes no data
        # ids as far back as a rollback reaches: the ring's span, and pinned snapshots from before a warning
        reach = rollbacks.snapshot_every * (rollbacks.keep_in_memory + rollbacks.keep_pinned + 1)
        self.data = DataLedger(
            self.run_dir.store_dir if writes_skips else None, attribution, keep_steps=reach, ranks=self.dist
        )
        # after each applied update, under recover: the weights checked finite, a rollback at once when not; not with
        # a GradScaler (the actuator's rollback closes the scaler's step, which its update has closed already)
        scaling = scaler is not None and scaler.is_enabled()
        self._checks_weights = policy == "recover" and sync == "step" and not scaling
        self._checks_every_update = rollbacks.check_weights == "every_update"
        if policy == "recover" and self._checks_every_update and not self._checks_weights:
            where = "sync='deferred'" if sync != "step" else "an enabled GradScaler"
            warnings.warn(
                f"RecoveryConfig(check_weights='every_update') with {where}: no update's weights are read there (the "
                "check is off; keel finds non-finite weights at the next step); allowed as it is, or sync='step' "
                "without a GradScaler for the read",
                KeelWarning,
                stacklevel=2,
            )
        self._weights_read = False  # the first update's weights are read whatever the optimizer (its state may be
        # loaded from elsewhere)
        self._load_hooks: list[Any] = []  # (`_state_loaded`'s handles, registered once the Guard is made)
        acts = policy != "observe" and sync == "step"  # (deferred: the host learns of a skip one step late)
        self._running_stats = RunningStats.of(model) if acts else None
        replays = rollbacks.replay and policy != "observe" and self.dist is None  # observe changes nothing
        self.replay = StepReplay(model, self._params, rollbacks.replay_rtol) if replays else None
        if self.replay is not None:
            self.replay.mark_step_start()
        self.components.attach(model)
        self._resumed_settings: ResumedSettings | None = None  # judged at the first update (its loop sets its own)
        self._resumed = self._resume() if resume else None  # before the store's meta changes: it may refuse
        if continue_at is not None:
            self._continue_at(continue_at)
        self.recorder.meta(self._describe_run(policy, seed, config))
        self._held_scheduler: HeldScheduler | None = None
        if self._resumed is not None:
            self.global_step = self._resumed.step
            self.evaluation.resumed(self._resumed.step)
            if not steps_scheduler and scheduler is not None:
                self._held_scheduler = HeldScheduler(scheduler)
        self._start_step = self.global_step
        # an optimizer state loaded from elsewhere (the loop's checkpoint) makes the next update unproven: read it
        self._load_hooks = _on_state_loaded(optimizer, self._state_loaded) if self._checks_weights else []
        # The starting state is the snapshot of last resort: trouble that begins in the first steps (an LR far too
        # high from the start) can only be undone by starting over with the actions. It is taken at the first step,
        # not here: a checkpoint loaded (or an init run) after the Guard's line is the state step 0 trains from.
        self._first_snapshot_due = self.recovery is not None
        # its buffers, RNG and data positions though are those from before the step's forward, held here
        self._start = StartState.of(self.state) if self._first_snapshot_due else None
        self._end = (
            RunEnd(on_signal=lambda name: self.recorder.signal(name, self.global_step), on_exit=self._finish)
            if flush_on_exit and self.run_dir.path is not None
            else None
        )

    def _set_up_components(self, detectors: Sequence[Detector] | None) -> None:
        """The detectors (a rank-outlier detector added under torch.distributed) and the fence around every
        probe and detector; the detectors' baselines join the state a snapshot holds."""
        self.detectors = list(detectors) if detectors is not None else default_detectors()
        if self.dist is not None and detectors is None:
            # replicas: DDP averages the gradients in backward, so the ones keel measures must agree; a model whose
            # optimizer averages them inside step() (nanochat's) shows each rank's own, which differ by design
            replicated = isinstance(self.model, nn.parallel.DistributedDataParallel) and not self.dist.sharded
            self.detectors.append(RankOutlierDetector(RankOutlierConfig(replicated=replicated)))
        self.components = Components(self.probes, self.detectors, self._record_error)
        self.state.components.update(
            {f"detector/{i}/{d.name}": self.components.stateful(d) for i, d in enumerate(self.detectors)}
        )

    def _describe_run(self, policy: Policy, seed: int | None, config: dict[str, Any] | None) -> dict[str, Any]:
        """The run's meta: environment, settings, model and optimizer, this process's components."""
        meta = describe_environment() if self.run_dir.store_dir is not None else {}
        meta.update(
            policy=policy,
            seed=seed,
            config=config or {},
            status="running",
            run_id=self.run_dir.run_id,
            model={"class": type(self.model).__name__, "parameters": sum(p.numel() for _, p in self.named)},
            optimizer={"class": type(self.optimizer).__name__, "groups": len(self.optimizer.param_groups)},
            probes=[p.name for p in self.probes],
            detectors=[d.name for d in self.detectors],
            disabled=[],
        )  # this process's components; a resumed run's earlier list no longer holds
        if self.dist is not None:
            meta["distributed"] = self.dist.describe()
        return meta

    @property
    def findings(self) -> list[Finding]:
        """Every finding of the run so far."""
        return self.recorder.findings

    @property
    def decisions(self) -> list[Decision]:
        """Every decision so far that was not a plain ``"ok"``."""
        return self.recorder.decisions

    @property
    def resumed(self) -> bool:
        """Whether this Guard continued a run from its disk snapshots (``resume=True`` found one)."""
        return self._resumed is not None

    def start_at(self, step: int) -> Guard:
        """Number this run's steps from ``step``: a run a trainer continues from its own checkpoint (the HF
        Trainer's ``resume_from_checkpoint``, Lightning's ``ckpt_path``) in a new run folder, so that keel's steps,
        findings and store rows are the trainer's. Before the first step, and not with ``resume`` (a keel resume
        takes its step from its snapshot). Returns the guard.

        Raises:
            ValueError: ``step`` is not an int >= 0, the Guard has stepped, or it resumed a run.
        """
        if not is_step(step):
            raise ValueError(f"start_at(step={step!r}); allowed: an int from 0 to 2**62 - 1")
        if self._resumed is not None or self.global_step != self._start_step:
            why = "resumed the run from its snapshot" if self._resumed is not None else "has stepped already"
            raise ValueError(f"start_at({step}): this Guard {why}; allowed: before the first step of a new run")
        self.global_step = self._start_step = self.components.step = step
        if self.recovery is not None:
            self.recovery.first_step = step
        self.recorder.meta({"first_step": step})
        return self

    def track(self, obj: Stateful, name: str = "data") -> Guard:
        """Register the data position (an object with ``state_dict``/``load_state_dict``, e.g. a sampler), or an
        average of the model's weights that the loop keeps (an ``nn.Module``: a model EMA).

        Snapshots record it and ``resume=True`` restores it. A data position is not restored by a rollback:
        training goes on with fresh data, so the window that went wrong is not replayed. An ``nn.Module`` — timm's
        ``ModelEmaV2``/``ModelEmaV3``, ``torch.optim.swa_utils.AveragedModel``, and diffusers' ``EMAModel`` (not a
        module: known by its ``shadow_params``) — is restored by a rollback too, to
        the average of the update the restored model came from (a rollback otherwise leaves the EMA holding the
        damaged trajectory): ``guard.track(model_ema, name="ema")``. The loop's own update of it after
        ``optimizer.step()`` is taken into the snapshot at keel's next call. Call before the first step; when
        the guard resumed, the stored state is loaded into ``obj`` right here. Returns the guard.
        """
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise ValueError(f"track({type(obj).__name__}): allowed: an object with state_dict() and load_state_dict()")
        if not isinstance(name, str) or not name:
            raise ValueError(f"track(name={name!r}); allowed: a non-empty str")
        average = isinstance(obj, nn.Module) or hasattr(obj, "shadow_params")  # diffusers' EMAModel: not a Module
        if self.global_step != self._start_step:
            why = (
                "earlier snapshots lack the model average, and a rollback to one of them would leave it as it is"
                if average
                else "earlier snapshots lack the data position, and a resumed run's stored position would rewind "
                "the data"
            )
            raise ValueError(
                f"track({name!r}) after {self.global_step - self._start_step} step(s) of this Guard: {why}; "
                "allowed: track() before the first step()"
            )
        kind = "averaged" if average else "tracked"
        registered = self.state.averaged.get(name, self.state.tracked.get(name))
        if registered is not None and registered is not obj:
            raise ValueError(
                f"track({type(obj).__name__}, name={name!r}): {name!r} is registered already (for a "
                f"{type(registered).__name__} object), and one would replace the other in every snapshot; allowed: "
                f"a name of its own, e.g. guard.track(obj, name='{name}_2')"
            )
        if not average and _empty_state(obj):
            warnings.warn(
                f"guard.track({type(obj).__name__}): its state_dict() is empty, so a resume restores nothing for it "
                "and the data starts over (a SkipListSampler over torch's RandomSampler holds no position); "
                "allowed as it is, or track a sampler or loader that records its position",
                KeelWarning,
                stacklevel=2,
            )
        getattr(self.state, kind)[name] = obj
        if not average and self._start is not None:  # the first snapshot holds the position before the first batch
            self.components.call(f"track {name}", self._start.track, name, obj)
        stored = self._resumed.plain.get(kind, {}) if self._resumed is not None else {}
        if name in stored:
            obj.load_state_dict(copy.deepcopy(stored[name]))
        return self

    # ------------------------------------------------------------------------------------------------
    # Host-side bookkeeping: called inside a torch.compile'd train step, dynamo would trace into keel and compile
    # graphs of its Python logic; kept out, it costs the caller one graph break and runs exactly as in eager.
    @host_side
    def step(
        self,
        loss: Tensor | float,
        *,
        grad_norm: Tensor | float | None = None,
        signals: Mapping[str, Tensor | float] | None = None,
        batch_ids: Any = None,
        batch: Any = None,
    ) -> Decision:
        """Measure this step, decide, then apply the update, skip it or roll back. Call after ``backward()``.

        Args:
            loss: The step's loss (a scalar tensor or float); with gradient accumulation, the loss of the
                whole step (e.g. the mean over micro-batches), called once on the accumulation boundary.
            grad_norm: When the loop clips the gradients itself before this call, the norm its
                ``clip_grad_norm_`` returned (the norm *before* clipping): keel detects on it, as a clipped norm
                hides the spike, and stores the clipped gradients' norm as ``grad/clipped_norm``.
            signals: The loop's own values for this step, by key (e.g. a DPO loop's ``keel.signals.
                preference_signals(...)``, a GRPO loop's rewards and entropy): 0-d tensors stay on the device and
                ride in the step's one host copy; plain numbers are recorded as they are. Detectors, the store
                and the report read them like keel's own signals. keel's own keys (``loss``, ``grad/…``,
                ``lr``, …) are refused.
            batch_ids: The ids of the examples this step trained on (a 1-d integer tensor on the CPU, a range, a
                list of ints): stored with the step as ranges, written to the skip list when a rollback steps past
                the step, and used to name the examples a bad step is attributed to.
            batch: This step's batch, as the Guard's `Attribution` ``loss_fn`` takes it; held for this step only
                and used only when the step goes wrong.

        Returns:
            The `Decision` taken.

        Raises:
            ValueError: ``loss`` is not a real scalar; a signal that is not a real scalar or takes a key of keel's;
                ``batch_ids`` that are not non-negative integer ids.
            GuardClosed: `close` was called already (nothing is stepped).
            TrainingAborted: The escalation ladder ended in ``abort`` (the store is flushed first).
        """
        if self._closed:
            raise GuardClosed(
                f"Guard.step() after close(): the run was closed after {self.global_step} steps and "
                "nothing was stepped; allowed: step() before close() (to train on, create a new Guard; "
                "resume=True continues the run from its disk snapshots)"
            )
        if self.recovery is not None:  # the loop's scheduler calls since the last snapshot are in it now
            self.components.call("snapshots", self.recovery.complete_snapshot)
        if self._resumed_settings is not None:  # the loop has written its own settings for this update by now
            resumed_settings, self._resumed_settings = self._resumed_settings, None
            self.components.call("resume", resumed_settings.warn_left)
        if self._first_snapshot_due:
            self._first_snapshot_due = False
            self.components.call("snapshots", self._take_first_snapshot)
        if self._held_scheduler is not None and self._held_scheduler.holding:
            self._release_scheduler()
        loss_t = _as_scalar(loss)
        self._signals = split_signals(signals, loss_t.device)
        self._norm_before_clip = None if grad_norm is None else _as_scalar(grad_norm, "grad_norm")
        step = self.global_step
        self.data.note(step, batch_ids, batch)
        if self.data.ids is not None:
            self.components.call("recorder", self.recorder.batch, step, self.data.ids)
        now = time.perf_counter()
        step_time, self._last_call = (now - self._last_call if self._last_call is not None else math.nan), now
        if self.sync == "deferred":
            return self._step_deferred(step, loss_t, step_time)  # it runs the evals due after the step
        ctx: StepContext | None = None
        try:
            self._unscale()
            ctx = self._context(step, loss_t)
            obs = self._observe(ctx, step_time)
            norm_now = obs.values.get(keys.GRAD_CLIPPED_NORM, obs.values.get(keys.GRAD_NORM, math.nan))
            found = tuple(self.components.detect(obs))
            found = self.components.call("attribution", self.data.attribute, self.model, found) or found
            findings, transient = self._replay(step, obs, found)
            decision = transient or self.data.skip_if_attributed(self.escalation.decide(step, findings), self.policy)
        except Exception as exc:  # keel must never stop training: record, then step as the bare loop would
            obs, decision, norm_now = Observation(step=step), Decision(step=step, action="ok"), math.nan
            self.components.fail("guard", step, exc, disable=False)  # each probe and detector is fenced on its own
        # The proof judges the optimizer's settings as this update uses them (a scheduler keel steps moves them on in
        # apply), from keel's own gradient norm (the loop's grad_norm alone may be of a part: a clip over the head
        # only); a proof that raises is switched off (None), and every update is read from then on.
        measured = norm_now if self._norm_before_clip is None or keys.GRAD_CLIPPED_NORM in obs.values else math.nan
        reads_weights = self._checks_weights and not self.components.call(
            "weights proof", self._update_proven, decision, measured, ctx
        )
        # keel's own clipping scales the gradients as they are now: after the loop's clipping, if it clipped
        decision = self.actuator.apply(decision, norm_now, self.escalation.rollbacks_in_window(step))
        if decision.stepped and reads_weights:
            # a rollback now, before the loop's next forward
            decision = self.components.call("weights check", self._roll_back_broken_update, decision, ctx) or decision
        if self._running_stats is not None:  # a skipped update's forward leaves no trace in BatchNorm's statistics
            self.components.call("running statistics", self._keep_running_stats, decision)
        if decision.action == "rollback" and decision.restored_step is not None:
            # the restored weights are read after the next update, as the first update's: a snapshot copied beside
            # the loop may hold a NaN the loop wrote after the read before it; found, an older one is restored
            self._weights_read = False
            self.evaluation.after_rollback(decision.restored_step)
        if decision.stepped and ctx is not None:
            self._after_step(ctx)
        self.components.call("skip list", self.data.record_skips, decision)
        self.data.forget_batch()
        if self.replay is not None:
            self.replay.mark_step_start()
        self.global_step += 1
        self.components.step = self.global_step
        self.components.call("recorder", self.recorder.step, obs, decision)
        if decision.action != "abort":  # before the snapshot: a resume from it must not miss this round of evals
            self.evaluation.after_step(step)
        if self.recovery is not None:
            self.components.call("snapshots", self._snapshot, step, decision)
        if decision.action == "abort":
            self._finish("aborted")
            raise TrainingAborted(f"keel aborted the run at step {step}: {decision.reason}", decision)
        return decision

    def evaluate(
        self, name: str, fn: Callable[[nn.Module], Any], *, every: int, task: str | None = None, goal: Goal = "max"
    ) -> Guard:
        """Run ``fn(model)`` after every ``every``-th step and record what it returns as ``eval/<name>`` signals.

        It runs after step ``s`` when ``(s + 1) % every == 0`` (not before the first step), under
        ``torch.no_grad()`` in ``model.eval()``; every submodule's mode and the random state are put back after, so
        training draws the same random numbers as without it. ``fn`` returns a number, a 0-d tensor, a dict of
        metric → number (``eval/<name>/<metric>``), or a 1-d tensor of per-example scores (their mean is recorded;
        the scores go to `keel.guard.evaluation.EvalListener` s). An ``fn`` that raises is recorded as a
        ``keel_error`` finding and switched off; training goes on. See `keel.guard.evaluation`.

        Args:
            name: The eval's name (no ``/``).
            fn: The eval function; keep it cheap (a few hundred examples): it runs inside the training loop.
            every: Steps between runs.
            task: The phase (`phase` name) this eval measures: its evals feed the continual metrics
                (``continual/…``) and the stability-gap detector tells forgetting of that task after a switch.
            goal: ``"max"`` when higher is better (accuracy), ``"min"`` when lower is (a loss).

        Returns:
            The guard.

        Raises:
            ValueError: A bad name (or one already used), ``fn`` not callable, ``every`` not an int >= 1, a bad
                ``task`` or ``goal``.
        """
        self._check_open("evaluate")
        self.evaluation.add(EvalSpec(name=name, fn=fn, every=every, task=task, goal=goal))
        return self

    def record_eval(
        self, metrics: Mapping[str, float], *, name: str = "eval", task: str | None = None, goal: Goal = "max"
    ) -> dict[str, float]:
        """Record evals computed outside keel (the HF Trainer's ``on_evaluate``, Lightning's validation) as
        ``eval/<name>/<metric>`` signals of the last finished step (step 0 before the first step), fed to the
        same detectors and continual metrics as `evaluate`'s.

        Args:
            metrics: Metric name → number or 0-d tensor (the first is the one the continual metrics follow).
            name: The eval's name (no ``/``); its ``task`` and ``goal`` are fixed by the first call.
            task: The phase this eval measures (see `evaluate`).
            goal: ``"max"`` or ``"min"``.

        Returns:
            The signals recorded, by key.

        Raises:
            ValueError: Empty or non-numeric metrics; a bad name, task or goal, or a task/goal other than the first
                call's; a name that `evaluate` schedules.
            GuardClosed: after `close`.
        """
        self._check_open("record_eval")
        return self.evaluation.record(max(self.global_step - 1, 0), metrics, name=name, task=task, goal=goal)

    def phase(self, name: str) -> int:
        """Mark a switch of task, phase or data mix, taking effect from the next step; returns its index.

        The steps of each phase carry ``phase/index`` (recorded where it changes, and at step 0); the switches
        are kept in the run's meta (``phases``). Evals tied to a phase by ``task=`` feed the continual metrics,
        and the stability-gap detector watches the earlier tasks' evals after each switch.

        Raises:
            ValueError: ``name`` is not a non-empty str.
            GuardClosed: after `close`.
        """
        self._check_open("phase")
        return self.evaluation.phase(name, self.global_step)

    def remove_probe(self, name: str) -> None:
        """Stop running the probe called ``name``: gone from ``probes``, the steps and the store's ``probes`` meta.

        Raises:
            ValueError: No probe is called ``name`` (the message names the probes there are).
            GuardClosed: after `close`.
        """
        self._check_open("remove_probe")
        self.components.remove_probe(name)
        self.probes = list(self.components.probes)
        self.recorder.meta({"probes": [p.name for p in self.probes]})

    def _check_open(self, verb: str) -> None:
        if self._closed:
            raise GuardClosed(
                f"Guard.{verb}() after close(): the run was closed after {self.global_step} steps; "
                f"allowed: {verb}() before close()"
            )

    def close(self) -> None:
        """Send the last measurements, finish snapshots and flush the run store. Safe to call twice."""
        self._finish("finished")

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._finish(
            "finished"
            if exc_type is None
            else "aborted"
            if exc_type is TrainingAborted
            else f"failed: {exc_type.__name__}: {exc}"
        )

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
        names: tuple[str, ...] = self._names
        params: Sequence[Tensor] = self._params
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) < len(params):  # parameters without a gradient this step are left out
            with_grad = [(n, p) for n, p in self.named if p.grad is not None]
            names, params = tuple(n for n, _ in with_grad), [p for _, p in with_grad]
        if self.dist is not None and self.dist.sharded:  # probes read this rank's shard; RankSync combines them
            params, grads = [_local(p) for p in params], [_local(g) for g in grads]
        return StepContext(
            step=step,
            loss=loss,
            model=self.model,
            optimizer=self.optimizer,
            names=names,
            params=params,
            grads=grads,
            log_step=step % self.log_every == 0,
            batch=self.data.batch,
            batch_ids=self.data.ids,
        )

    def _measure(self, ctx: StepContext) -> Measurements:
        """The probes' measurements of this step; the loop's own pre-clipping norm in place of ``grad/norm``."""
        measured = self.components.measure(ctx)
        if self._norm_before_clip is not None:
            if keys.GRAD_NORM in measured:
                measured[keys.GRAD_CLIPPED_NORM] = measured[keys.GRAD_NORM]
            # on the loss's device, as every measurement (a step with no gradient has no parameter to take it from)
            measured[keys.GRAD_NORM] = self._norm_before_clip.detach().to(ctx.loss.device, torch.float32)
        measured.update(self._signals[0])
        return measured

    def _observe(self, ctx: StepContext, step_time: float) -> Observation:
        """This step's observation: measured on the device, brought to the host in one copy, with host values."""
        values, per_param = self._to_host(self._measure(ctx))
        self._read_parameters_if_non_finite(values, per_param, ctx.names, ctx.params)
        values.update(self._host_values(ctx.step, step_time))
        return Observation(step=ctx.step, values=values, per_param=per_param)

    def _to_host(self, measured: Measurements) -> HostValues:
        """Pack this step's measurements with the previous step's late ones, agree across ranks, copy to the host
        once; the late ones are recorded here."""
        if self.scaler is not None and self.scaler.is_enabled() and self.scaler._scale is not None:
            measured[keys.AMP_SCALE] = self.scaler._scale  # a tensor: read in the same copy, no extra sync
            # unscale_ left its found-inf flags on the device: an overflow read in the same copy, no extra sync
            # (read defensively: a scaler that only looks like torch's may keep no per-optimizer states)
            states = getattr(self.scaler, "_per_optimizer_states", {})
            found_inf = states.get(id(self.optimizer), {}).get("found_inf_per_device")
            if found_inf:
                flags = [f.to(self.scaler._scale.device) for f in found_inf.values()]
                measured[keys.AMP_OVERFLOW] = (torch.stack(flags).sum() > 0).float()
        packed = pack(measured, self._late)
        # every rank now decides on the same values (on a healthy step in one collective, the host copy's)
        now, late = unpack(packed) if self.dist is None else self.dist.to_host(packed)
        if self._late:
            self.recorder.late(Observation(step=self._late_step, values=late[0], per_param=late[1]))
            self._late = {}
        return now

    def _read_parameters_if_non_finite(
        self, values: dict[str, float], per_param: dict[str, Any], names: Sequence[str], params: Sequence[Tensor]
    ) -> None:
        """On a step whose loss or gradient norm is NaN/Inf, add the parameters' norms, whatever the parameter-norm
        probe's cadence: a non-finite parameter (written by an earlier update, or by the loop) makes every gradient
        non-finite too, and a skip cannot mend it — only a rollback can. One more reduction and host copy, on such a
        step only (on every rank alike: the values it is judged on agree across ranks)."""
        if keys.PARAM_NORM in values or all(math.isfinite(values.get(k, 0.0)) for k in (keys.LOSS, keys.GRAD_NORM)):
            return
        packed = pack(parameter_norms(names, params), {})
        (checked, checked_per_param), _ = unpack(packed) if self.dist is None else self.dist.to_host(packed)
        values[keys.PARAM_NORM] = checked[keys.PARAM_NORM]
        per_param[keys.PARAM_NORM_PER_PARAM] = checked_per_param[keys.PARAM_NORM_PER_PARAM]

    def _host_values(self, step: int, step_time: float) -> dict[str, float]:
        """The values the host knows without measuring: learning rates (LR back-off applied), step time."""
        scales = self.actuator.lr_scales(step)
        lrs = [float(g["lr"]) * s for g, s in zip(self.optimizer.param_groups, scales, strict=True)]
        values = {keys.LR: lrs[0]}
        values.update({f"{keys.LR}/{i}": lr for i, lr in enumerate(lrs[1:], 1) if lr != lrs[0]})
        if math.isfinite(step_time):
            values[keys.STEP_TIME] = step_time
        values.update(self._signals[1])
        values.update(self.evaluation.host_values())
        return values

    def _replay(
        self, step: int, obs: Observation, findings: tuple[Finding, ...]
    ) -> tuple[tuple[Finding, ...], Decision | None]:
        """With ``RecoveryConfig(replay=True)``, on a critical spike or non-finite value: recompute the step, and
        add what it found to those findings' evidence. A transient fault is skipped here (the decision returned);
        data leaves the decision to the escalation ladder (None)."""
        if self.replay is None or self.data.batch is None or not any(map(_replayable, findings)):
            return findings, None
        assert self.data.attribution is not None  # checked with the arguments
        result = self.components.call(
            "replay",
            self.replay.replay,
            self.data.attribution.loss_fn,
            self.data.batch,
            obs.values.get(keys.LOSS, math.nan),
            obs.values.get(keys.GRAD_NORM, math.nan),
        )
        if result is None:
            return findings, None
        replayed = {"replay": result.to_json()}
        marked = tuple(
            dataclasses.replace(f, evidence={**f.evidence, **replayed}) if _replayable(f) else f for f in findings
        )
        if result.reproducible:
            return marked, None
        return marked, Decision(
            step=step,
            action="skip",
            findings=marked,
            reason=(
                f"transient fault: {result.describe()}: not reproducible, so not the data (hardware, silent data "
                "corruption or a racy kernel); update skipped, nothing rolled back or added to the skip list"
            ),
        )

    def _update_proven(self, decision: Decision, grad_norm: float, ctx: StepContext | None) -> bool:
        """Whether the weights this update leaves need no read (`keel.guard.weights_check`): never with
        ``check_weights="every_update"``, under ``torch.distributed``, for the first update or one a snapshot follows;
        else when `update_proven_finite` vouches for it, from this step's finite gradient norm."""
        if self._checks_every_update or self.dist is not None or not self._weights_read or self.recovery is None:
            return False
        if ctx is None or not math.isfinite(grad_norm) or self.recovery.due_after(decision.step, decision.findings):
            return False
        dtypes = set(map(_DTYPE, ctx.params))
        return update_proven_finite(self.optimizer, dtypes, self.actuator.lr_scales(decision.step))

    def _roll_back_broken_update(self, decision: Decision, ctx: StepContext | None) -> Decision:
        """The decision after checking the weights this applied update left: as it is when they are finite, else a
        rollback (or the abort the escalation ladder turns it into), carried out now (`keel.guard.weights_check`).
        Only the parameters that had a gradient are read (``ctx``'s): the update changed no other, and a trainable
        parameter the forward never uses may hold anything (``torch.empty``'s NaN) without harm."""
        if ctx is not None:
            names, params = ctx.names, ctx.params
        else:  # keel's measuring failed this step; every rank still takes part in the check (a collective)
            names = self._names
            params = [_local(p) for p in self._params] if self.dist is not None and self.dist.sharded else self._params
        self._weights_read = True
        broken = non_finite_parameters(names, params, self.dist)
        if not broken:
            return decision
        step = decision.step
        rollback = self.escalation.decide(step, (*decision.findings, broken_update_finding(step, broken)))
        return self.actuator.apply(rollback, math.nan, self.escalation.rollbacks_in_window(step))

    def _state_loaded(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's state was loaded (``load_state_dict``: the loop's checkpoint, keel's rollback): the weights
        are read after the next update, as after the first. The proof's moments are running averages of gradients
        keel measured finite; a loaded state may hold anything (a NaN in Adam's ``exp_avg_sq`` makes AdamW write NaN
        from finite gradients)."""
        self._weights_read = False

    def _keep_running_stats(self, decision: Decision) -> None:
        """Hold the running statistics after an applied update or a rollback; put them back after a skip."""
        assert self._running_stats is not None
        if decision.stepped or decision.action == "rollback":
            self._running_stats.save()
        else:
            self._running_stats.restore()

    def _after_step(self, ctx: StepContext) -> None:
        self._late.update(self.components.after_step(ctx))
        self._late_step = ctx.step

    # --- record --------------------------------------------------------------------------------------
    def _release_scheduler(self) -> None:
        held = self._held_scheduler.release()  # type: ignore[union-attr]
        if held:
            self.components.call("recorder", self.recorder.meta, {"scheduler_calls_held_on_resume": held})

    def _take_first_snapshot(self) -> None:
        assert self.recovery is not None
        if self._start is not None:
            self.recovery.ring.start = self._start.still_the_start(self.state)
            self._start = None
        self.actuator.after_step(self.global_step)
        self.recovery.ring.start = None  # (no snapshot was due: a resumed run's was taken at its resume)
        self.recovery.complete_snapshot()  # no scheduler call of the loop is pending

    def _snapshot(self, step: int, decision: Decision) -> None:
        """Steer the snapshot schedule with this step's outcome; take a snapshot if one is due."""
        assert self.recovery is not None
        self.recovery.note(step, decision.findings, skipped=not decision.stepped)
        if decision.stepped:
            self.actuator.after_step(self.global_step)
        self._record_disk_snapshots()

    def _record_error(self, component: str, step: int, exc: BaseException, disabled: bool) -> None:
        """Record an error inside keel (once per component) as a ``keel_error`` finding; never raises."""
        try:
            self.recorder.error(component, step, exc, disabled=disabled)
            if disabled:
                self.recorder.meta({"disabled": list(self.components.disabled)})
        except Exception as record_exc:  # the recorder itself is broken: say it on the console at least
            warnings.warn(
                f"keel: {component} raised {type(exc).__name__}: {exc} at step {step}, and recording "
                f"it failed too ({type(record_exc).__name__}: {record_exc})",
                KeelWarning,
                stacklevel=3,
            )

    def _resume(self) -> Snapshot | None:
        """Restore the newest good snapshot of the run being continued (None: it has none; a new run starts),
        and drop the store's rows of the steps that will be done again. When it refuses — the setup differs from
        the snapshot's, the ranks found different snapshots — the Guard is closed, writing nothing, and the
        run_dir released before the error is raised."""
        scheduled = self.state.scheduler is not None
        settings = optimizer_settings(self.optimizer, scheduled=scheduled)
        try:
            resumed = (
                self.recovery.resume(
                    self.run_dir.resumes, run_steps=self.run_dir.resumes_steps, at_most=self._newest_every_rank_holds()
                )
                if self.recovery is not None
                else None
            )
            if self.dist is not None:
                resumed = self._loaded_by_every_rank(resumed)
                step = resumed.step if resumed is not None else -1
                if not self.dist.all_equal(step):
                    raise ValueError(
                        f"resume: rank {self.dist.rank} found the snapshot of step {step}, another "
                        "rank a different one; allowed: every rank's run_dir/rank-<r>/snapshots "
                        "holding the same newest good step"
                    )
        except BaseException:
            self._closed = True
            self.components.detach(0)
            if self.recovery is not None:
                self.recovery.close()
            if self.recorder.writer is not None:
                self.recorder.writer.close()
            self.run_dir.release()
            raise
        if resumed is not None:
            self._resumed_settings = ResumedSettings(self.optimizer, settings, scheduled=scheduled)
        if self.recorder.writer is not None and (resumed is not None or self.run_dir.resumes_steps > 0):
            start = resumed.step if resumed is not None else 0  # no snapshot: the run starts over
            self.recorder.resumed(start, stored=self.run_dir.resumes_steps)
            if start and self.run_dir.store_dir is not None:
                self.components.call("data ledger", self.data.recall, self.run_dir.store_dir, start)
        return resumed

    def _continue_at(self, step: int) -> None:
        """``continue_at``: the loop restored the state of ``step`` itself (a trainer's own checkpoint) and the run in
        run_dir goes on from there: the store's rows of the steps done again are dropped, its disk snapshots past
        ``step`` (a future the loop does again) deleted, no snapshot is loaded and no rollback reaches before ``step``;
        the skip list is kept (a rollback done again adds no second entry)."""
        self.global_step = self.components.step = step
        if self.recovery is not None:
            self.recovery.first_step = step  # no rollback reaches before the state the loop restored
            if self.recovery.disk is not None:
                self.recovery.disk.keep_until(step, self.run_dir.resumes)
        if self.recorder.writer is not None and self.run_dir.resumes_steps > 0:
            self.recorder.resumed(step, stored=self.run_dir.resumes_steps, source="the loop's own checkpoint")
            if step and self.run_dir.store_dir is not None:
                self.components.call("data ledger", self.data.recall, self.run_dir.store_dir, step)

    def _newest_every_rank_holds(self) -> int | None:
        """Under torch.distributed, the newest snapshot step every rank has on disk: the ranks write their own
        snapshots in the background, so a job killed mid-write can leave one rank a step ahead (None: one process;
        -1 when some rank has none: every rank starts over). A rank that gives up a newer snapshot says so."""
        if self.dist is None or self.recovery is None:
            return None
        mine = self.recovery.newest_on_disk()
        agreed = int(-self.dist.all_max([-float(mine)])[0])
        if mine > agreed:
            warnings.warn(
                f"resume: rank {self.dist.rank} holds a snapshot of step {mine}, but not every rank does (a write "
                f"cut short when the job stopped): every rank continues from the newest step all hold ({agreed})",
                KeelWarning,
                stacklevel=4,
            )
        return agreed

    def _loaded_by_every_rank(self, resumed: Snapshot | None) -> Snapshot | None:
        """After each rank loaded its newest good snapshot (of at most the agreed step), the oldest of those, which
        every rank holds: a rank whose newest was corrupt loaded an older one. A rank ahead loads that one instead,
        and says so. (When a rank loaded none, the others cannot start over: the all-equal check refuses.)"""
        if self.dist is None or self.recovery is None:
            return resumed
        step = resumed.step if resumed is not None else -1
        oldest = int(-self.dist.all_max([-float(step)])[0])
        if step <= oldest or oldest < 0:
            return resumed
        warnings.warn(
            f"resume: rank {self.dist.rank} loaded the snapshot of step {step}, but another rank could not (it was "
            f"corrupt or missing there): every rank continues from step {oldest}",
            KeelWarning,
            stacklevel=5,
        )
        self.recovery.ring.drop_after(-1)  # the snapshot loaded first is not this run's past any more
        return self.recovery.resume(self.run_dir.resumes, run_steps=self.run_dir.resumes_steps, at_most=oldest)

    def _finish(self, status: str) -> None:
        if self._closed:
            return
        if self.sync == "deferred":
            self.components.call("guard", self._close_deferred)
        self._closed = True
        if self._held_scheduler is not None:
            self._held_scheduler.close()
        if self._end is not None:
            self._end.close()
        self.components.detach(self.global_step)
        for handle in self._load_hooks:
            handle.remove()
        if self._late:
            self.components.call("recorder", self._record_late)
        if self.recovery is not None:
            self.recovery.close()
            self.components.call("snapshots", self._record_disk_snapshots)
        self.recorder.close(status, self.global_step, self.components.failures)
        self.run_dir.release()
        if self.dist is not None:
            self.dist.close()  # a DDP join made later gets DDP's own join hook, without keel's shadow

    def _record_late(self) -> None:
        values, per_param = unpack(pack(self._late))[0]
        self._late = {}
        self.recorder.late(Observation(step=self._late_step, values=values, per_param=per_param))

    def _record_disk_snapshots(self) -> None:
        disk = self.recovery.disk if self.recovery is not None else None
        written = disk.written if disk is not None else []
        for step, path, checksum in written[self._snapshots_recorded :]:
            self.recorder.snapshot(step, path, checksum)
        self._snapshots_recorded = len(written)
        if disk is not None and (disk.superseded or disk.evicted):  # writes slower than snapshots were due
            self.recorder.meta(
                {"disk_snapshots": {"written": len(written), "superseded": disk.superseded, "evicted": disk.evicted}}
            )


def _on_state_loaded(optimizer: Any, hook: Callable[[Any], None]) -> list[Any]:
    """``hook`` registered as a ``load_state_dict`` post-hook of ``optimizer``, or of each part of a `keel.Optimizers`
    (its own ``load_state_dict`` loads theirs); the handles. None where an optimizer takes no such hook."""
    parts = optimizer.optimizers if isinstance(optimizer, Optimizers) else (optimizer,)
    return [
        part.register_load_state_dict_post_hook(hook)
        for part in parts
        if isinstance(getattr(part, "_optimizer_load_state_dict_post_hooks", None), dict)
    ]


def _empty_state(obj: Stateful) -> bool:
    """Whether ``obj.state_dict()`` is an empty mapping (a failing one is not judged here)."""
    try:
        state = obj.state_dict()
    except Exception:
        return False
    return isinstance(state, Mapping) and not state


def _trainable_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
    """The model's trainable parameters by name, after checking that model and optimizer are what they claim."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__}; allowed: a torch.nn.Module")
    if not hasattr(optimizer, "step") or not hasattr(optimizer, "param_groups"):
        raise ValueError(f"optimizer={type(optimizer).__name__}; allowed: a torch.optim.Optimizer")
    for part in optimizer.optimizers if isinstance(optimizer, Optimizers) else (optimizer,):
        refuse_closure_only("keel.Guard", part)  # Guard.step calls optimizer.step() with no closure
    try:
        layout = optimizer.state_dict() if callable(getattr(optimizer, "state_dict", None)) else None
    except Exception as exc:  # ZeroRedundancyOptimizer's needs a collective consolidate_state_dict() first
        raise ValueError(
            f"optimizer={type(optimizer).__name__}: its state_dict() raised {type(exc).__name__}: {exc}; allowed: an "
            "optimizer whose state_dict() works on every rank at any step, as torch.optim's do (keel snapshots and "
            "checks it; ZeroRedundancyOptimizer is not supported: under DDP give keel a torch.optim optimizer, or "
            "shard with FSDP2's fully_shard)"
        ) from None
    if not (isinstance(layout, dict) and "state" in layout and "param_groups" in layout):
        got = sorted(layout) if isinstance(layout, dict) else type(layout).__name__
        raise ValueError(
            f"optimizer={type(optimizer).__name__}: its state_dict() is {got}, not torch's layout; allowed: a "
            "torch.optim.Optimizer, or an object whose state_dict() has 'state' and 'param_groups' (several "
            "optimizers: keel.Optimizers)"
        )
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        n_all = sum(1 for _ in model.parameters())
        raise ValueError(
            f"model {type(model).__name__} has {n_all} parameters, none trainable; "
            "allowed: a model with at least one parameter with requires_grad=True"
        )
    return named


def _replayable(finding: Finding) -> bool:
    """A critical one-step spike, which a replay can tell data from a transient fault: not a lasting level shift,
    whose damage is in the weights (a replay would skip it as transient and no rollback would follow)."""
    return finding.severity == "critical" and finding.kind in SPIKE_KINDS and skip_mends(finding)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (FSDP2); a plain tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _as_scalar(loss: Tensor | float, name: str = "loss") -> Tensor:
    """The value as a plain 0-d tensor. A DTensor — what ``clip_grad_norm_`` returns over FSDP2's parameters — is
    taken as its full value (a collective for a partial one: every rank passes its own), as keel packs it beside
    plain tensors (a DTensor made every step fail, and keel guarded nothing)."""
    check_loss(loss, name)
    if not isinstance(loss, Tensor):
        return torch.tensor(float(loss))
    full = getattr(loss, "full_tensor", None)
    return (full() if callable(full) else loss).detach().reshape(())


def _build_probes(probes: str | Sequence[str | Probe]) -> list[Probe]:
    if isinstance(probes, str):
        if probes not in PROBE_SETS:
            raise ValueError(f"probes={probes!r}; allowed: {', '.join(PROBE_SETS)} or a list of probes")
        probes = PROBE_SETS[probes]
    if not isinstance(probes, Sequence):
        raise ValueError(f"probes={probes!r}; allowed: {', '.join(PROBE_SETS)} or a list of probes")
    built = []
    for probe in probes:
        try:
            built.append(create_probe(probe) if isinstance(probe, str) else probe)
        except ValueError as exc:
            raise ValueError(f"probes: {exc}") from None
    return check_probes(built)
