"""Recovery: when to snapshot, how to roll back, and the actions that follow — for `Guard`'s recover policy.

Snapshots are taken every ``snapshot_every`` steps, and every ``snapshot_every_on_warning`` steps while an
early warning is open (so a rollback lands close to where the trouble began), but never within
``quiet_steps`` of a skip or a critical finding, so the ring does not fill with damaged states. When a
warning opens, the newest snapshot from before its onset is pinned (``keep_pinned``): the dense snapshots
that follow, or hundreds of quiet steps before the warning turns critical, do not push it out. A rollback
restores the newest snapshot from before the trouble's onset, less ``rollback_margin``, reseeds the RNGs so the
window is not replayed, and applies the actions. A snapshot that left out a parameter which may have changed since
(`keel.recover.fixed`) is passed over, with the reason, for an older one.

The trouble's onset is the earliest of the critical findings' ``onset_step`` evidence and the onsets of the warnings
still open. A warning is open from the step it is reported until a rollback or until more than ``snapshot_every``
steps pass with no new warning (the stretch over which a warning keeps snapshots dense). Skips and critical findings
do not keep it open: one-off skips (a NaN batch every few dozen steps) would otherwise hold a warning open for
hundreds of steps and send a later rollback back to its onset. A loss-spike warning from step 42 followed by the
divergence detector's critical with its own later onset 49 is one episode: the state restored is from before 42, not
one taken while the warning was open. When no snapshot from before an open warning's onset is kept, the critical
finding's own onset is used (said so in the decision).

A rollback that was itself followed by no update before the next rollback (every step in between was skipped or
rolled back) restored a state that was still in trouble: the actions it applied never ran, so restoring it again
would repeat the same steps. The next rollback goes to a snapshot older than it, or the run aborts when there is
none; it never loops on one damaged snapshot.
"""

from __future__ import annotations

import copy
import math
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from keel._core import keys
from keel._core.errors import KeelWarning
from keel._core.finding import Finding
from keel._core.validate import check_types, require_ints, require_positive
from keel.recover.actions import (
    HISTORY_KEY,
    ActionState,
    apply_actions,
    choose_actions,
    current_lr_scale,
    group_lr_scales,
    router_caused,
    router_param_groups,
)
from keel.recover.compat import describe_differences, setup_differences
from keel.recover.disk import SNAPSHOT_DIR, DiskSnapshots, snapshot_step
from keel.recover.fixed import fixed_differences, stale_reason
from keel.recover.schedule_free import groups_in_mode_of, swaps_weights
from keel.recover.snapshot import Snapshot, SnapshotRing
from keel.recover.state import TrainingState, capture_averaged, model_tensors, reseed, restore, trained_keys


@dataclass(kw_only=True)
class RecoveryConfig:
    """Settings of snapshots and rollback.

    Attributes:
        snapshot_every: Steps between in-memory snapshots.
        snapshot_every_on_warning: Steps between snapshots while a warning is open.
        keep_in_memory: Snapshots in the memory ring (at least 2: a ring of one holds only the newest).
        keep_pinned: Snapshots from before a warning's onset kept beyond the ring (the newest pins win).
        disk_every: Write every n-th memory snapshot to disk (``run_dir/snapshots``); ``None`` for memory only.
        keep_on_disk: Disk snapshots kept; None (the default): as many as a resumed run needs to roll back as far as
            the memory ring reaches, ``ceil(keep_in_memory / disk_every)`` and at least 2 (`disk_keep`).
        quiet_steps: No snapshot within this many steps of a skip or a critical finding.
        rollback_margin: Roll back to a snapshot at least this many steps before the onset.
        lr_backoff: LR factor of the ``lr_backoff`` action (compounds over repeated rollbacks).
        min_lr_scale: The smallest LR scale back-offs may reach: a rollback that would go below it aborts the
            run instead (rollbacks spaced wider than the escalation window otherwise compound without end, and a
            run creeping on at 1e-10 of its LR is stopped in all but name).
        cooldown_steps: Steps over which the LR scale ramps back to 1; ``None`` keeps it.
        copy_in_background: CPU snapshots copied by a worker thread while the next step runs (True), or by the
            training thread at once (False); ``None`` chooses the thread when the process has a core that
            torch's threads do not take (`keel.recover.snapshot`). CUDA snapshots always use a side stream. A loop
            that writes the weights between its steps (WGAN's weight clipping, a max-norm constraint) should set False
            on a CPU: a copy still running then may take some tensors before that write and some after it.
        max_rollbacks: Rollbacks within ``rollback_window`` steps after which the run aborts (the escalation
            ladder's cap, `keel.recover.escalation`).
        rollback_window: The window, in steps, of that cap.
        replay: On a critical spike or non-finite value, recompute the step on the same batch to tell data (it
            reproduces) from a transient fault (it does not: the update is skipped, nothing rolled back or added to
            the skip list); `keel.recover.replay`. Needs ``Guard(attribution=...)`` (its ``loss_fn``) and ``batch=``.
        replay_rtol: Relative difference of loss and gradient norm within which a replay reproduces the step.
        copy_fixed: Snapshots copy every parameter, also those the optimizer cannot change (a LoRA fine-tune's
            frozen base), which by default are only recorded (`keel.recover.fixed`). For code that writes frozen
            weights during training through ``p.data`` (peft's ``merge_adapter``), which a rollback cannot see.
        check_weights: Which applied updates the Guard reads the weights after (``policy="recover"``, to roll back
            before the loop's next forward when one left NaN/Inf; `keel.guard.weights_check`): ``"unproven"``, those
            whose finite result keel cannot prove (any but torch.optim's Adam, AdamW and SGD from finite gradients
            with sane settings and no step hooks; float16 weights; under ``torch.distributed``), the first one, and
            each one a snapshot follows; ``"every_update"``, all of them (one more read of the weights a step), for
            a loop that writes weights between its backward and the update and samples from them before keel's
            next step.
    """

    snapshot_every: int = 25
    snapshot_every_on_warning: int = 5
    keep_in_memory: int = 4
    keep_pinned: int = 2
    disk_every: int | None = None
    keep_on_disk: int | None = None
    quiet_steps: int = 5
    rollback_margin: int = 1
    lr_backoff: float = 0.1
    min_lr_scale: float = 1e-3
    cooldown_steps: int | None = None
    copy_in_background: bool | None = None
    max_rollbacks: int = 3
    rollback_window: int = 500
    replay: bool = False
    replay_rtol: float = 0.1
    copy_fixed: bool = False
    check_weights: Literal["unproven", "every_update"] = "unproven"

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(
            self,
            "snapshot_every",
            "snapshot_every_on_warning",
            "max_rollbacks",
            "rollback_window",
        )
        require_ints(self, "keep_pinned", "quiet_steps", "rollback_margin", minimum=0)
        # a rollback goes before the trouble's onset, and a ring of one holds only the newest snapshot, which is
        # taken after it whenever the onset is at or before that snapshot's step: such a run could never roll back
        require_ints(self, "keep_in_memory", minimum=2)
        require_positive(self, "replay_rtol")
        if self.disk_every is not None:
            require_ints(self, "disk_every")
        if self.keep_on_disk is not None:
            require_ints(self, "keep_on_disk")
        if self.cooldown_steps is not None:
            require_ints(self, "cooldown_steps")
        if (
            isinstance(self.lr_backoff, bool)
            or not isinstance(self.lr_backoff, (int, float))
            or not 0 < self.lr_backoff <= 1
        ):
            raise ValueError(
                f"RecoveryConfig.lr_backoff={self.lr_backoff!r}; allowed: a number with 0 < lr_backoff <= 1"
            )
        if (
            isinstance(self.min_lr_scale, bool)
            or not isinstance(self.min_lr_scale, (int, float))
            or not 0 < self.min_lr_scale <= 1
        ):
            raise ValueError(
                f"RecoveryConfig.min_lr_scale={self.min_lr_scale!r}; allowed: a number with 0 < min_lr_scale <= 1"
            )

    def disk_keep(self) -> int:
        """The disk snapshots kept: ``keep_on_disk``, or (None) enough that a resume fills the memory ring with the
        run's older snapshots as the uninterrupted run held them: a resumed run killed inside a trouble's window
        rolls back as far as that run would, instead of aborting on every restart."""
        if self.keep_on_disk is not None:
            return self.keep_on_disk
        return max(2, -(-self.keep_in_memory // (self.disk_every or 1)))


class RecoveryExhausted(Exception):
    """A rollback would need an action beyond its limit (`RecoveryConfig.min_lr_scale`), or every snapshot it could
    restore left out a parameter changed since (`keel.recover.fixed`): the run aborts instead."""


@dataclass
class RollbackResult:
    """What a rollback restored, the actions it applied, and why newer snapshots were passed over (empty: none)."""

    snapshot: Snapshot
    actions: list[str]
    passed_over: list[str] = field(default_factory=list)
    onset: int = 0  # the step the trouble began, as the rollback judged it (the snapshot is from before it)
    onset_from: str = ""  # why that onset, when not the critical findings' own (empty: theirs)


class Recovery:
    """Owns the snapshot ring, the disk tier and the actions of one run.

    Its own counters (rollbacks so far, the snapshot schedule) and the actions in force are part of the run's
    history (`TrainingState.history`): a rollback keeps them, a resume restores them, so actions compound
    over repeated rollbacks and a resumed run takes its snapshots and reseeds exactly as the uninterrupted one.
    """

    def __init__(
        self, state: TrainingState, config: RecoveryConfig, run_dir: str | Path | None, *, run_id: str | None = None
    ) -> None:
        self.state, self.config = state, config
        self.actions = ActionState()
        state.history[HISTORY_KEY] = self.actions
        state.history["recovery"] = self
        self.ring = SnapshotRing(
            config.keep_in_memory, config.keep_pinned, config.copy_in_background, copy_fixed=config.copy_fixed
        )
        # a schedule-free optimizer's eval()/train() move the parameters between steps, where the ring's background
        # copy assumes none changes before the next optimizer.step(): its snapshots are finished before keel returns
        self._copied_at_once = swaps_weights(state.optimizer)
        # with a run_dir the disk tier always exists, so a resume reads the snapshots there even when this run
        # writes none (``disk_every=None``)
        self.disk = (
            DiskSnapshots(Path(run_dir) / SNAPSHOT_DIR, config.disk_keep(), run_id=run_id)
            if run_dir is not None
            else None
        )
        self.rollbacks = 0
        # the step of the state the run started from (`Guard.start_at`: a trainer's own checkpoint): no snapshot
        # of keel's precedes it, so a rollback for trouble there restores it (margin or not)
        self.first_step = 0
        self._last_snapshot = -math.inf
        self._last_trouble = -math.inf
        self._last_warning = -math.inf
        self._taken = 0
        # The open warnings' earliest onset and which warning gave it (None: no warning open), and the rollback
        # after which no update has been applied yet: (its step, the snapshot step it restored), else None.
        self._episode: tuple[int, str] | None = None
        self._unproven: tuple[int, int] | None = None
        self._resumed_tracked: list[str] | None = None  # data positions of the resumed snapshot, checked once
        self._resumed_averaged: list[str] = []  # and its model averages (`TrainingState.averaged`)
        # The loop steps the scheduler itself (Guard(steps_scheduler=False), keel.watch): after the update keel
        # snapshots, per update or per epoch. The newest snapshot's scheduler state, and the LRs it wrote into the
        # optimizer's groups, are taken at keel's next call (`complete_snapshot`), and only then is it written to
        # disk: taken with the rest, they are one call behind the update, and a rollback or a resume would leave the
        # schedule a step (or an epoch) late for good.
        self.loop_steps_scheduler = False
        self._awaiting: tuple[Snapshot, bool] | None = None  # (snapshot, due on disk) without its scheduler yet

    # --- snapshots ----------------------------------------------------------------------------------
    def note(self, step: int, findings: tuple[Finding, ...], skipped: bool) -> None:
        """Keep track of trouble and warnings (they steer the snapshot schedule); pin the state before a
        warning's onset."""
        if self._resumed_tracked is not None:
            self._check_tracked()
        if not skipped:
            self._unproven = None  # an update ran on the restored state: it was not still in trouble
        rolled_back_now = self._unproven is not None and self._unproven[0] == step
        self._episode = None if rolled_back_now else self._open_episode(step, findings)
        if skipped or any(f.severity == "critical" for f in findings):
            self._last_trouble = step
        for finding in findings:
            if finding.severity == "warning":
                self._last_warning = step
                snap = self.ring.newest_before(self._rollback_point(_onset_of(finding)))
                if snap is not None:
                    self.ring.pin(snap)

    def _open_episode(self, step: int, findings: tuple[Finding, ...]) -> tuple[int, str] | None:
        """The earliest onset among the warnings open at ``step``, this step's included, and which one gave it."""
        quiet_for = step - self._last_warning  # warnings only: skips would keep a stale onset alive (review)
        episode = self._episode if quiet_for <= self.config.snapshot_every else None
        for finding in findings:
            if finding.severity == "warning" and (episode is None or _onset_of(finding) < episode[0]):
                episode = (_onset_of(finding), f"the {finding.kind} warning on {finding.signal} of step {finding.step}")
        return episode

    def after_step(self, steps_done: int) -> Snapshot | None:
        """Take a snapshot of the state at the start of step ``steps_done`` if one is due."""
        if not self._due(steps_done, self._last_warning, self._last_trouble):
            return None
        to_disk = self.writes_disk and (self._taken + 1) % self.config.disk_every == 0  # type: ignore[operator]
        return self._take(steps_done, to_disk=to_disk)

    def due_after(self, step: int, findings: tuple[Finding, ...]) -> bool:
        """Whether the applied update of ``step`` will be snapshotted: `after_step` (``step + 1``) takes one once
        `note` has seen ``findings`` (a warning shortens the interval, a critical finding holds snapshots back)."""
        warned = any(f.severity == "warning" for f in findings)
        critical = any(f.severity == "critical" for f in findings)
        return self._due(step + 1, step if warned else self._last_warning, step if critical else self._last_trouble)

    def _due(self, steps_done: int, last_warning: float, last_trouble: float) -> bool:
        interval = (
            self.config.snapshot_every_on_warning
            if steps_done - last_warning <= self.config.snapshot_every
            else self.config.snapshot_every
        )
        return steps_done - self._last_snapshot >= interval and steps_done - last_trouble > self.config.quiet_steps

    @property
    def writes_disk(self) -> bool:
        return self.disk is not None and self.config.disk_every is not None

    def _take(self, steps_done: int, *, to_disk: bool, after_recorded: bool = False) -> Snapshot:
        # The schedule is updated before the capture, so each snapshot records the schedule as it stands after
        # it was taken: a run resumed from it snapshots exactly as the uninterrupted run did.
        # ``after_recorded``: taken inside a step (a rollback's), before the run store was given that step's rows:
        # written at keel's next call, so the store flushed before it is published holds them (written at once, a
        # kill right after the rollback lost the rollback's decision from the store while the resume went on
        # from the restored state).
        self._last_snapshot = steps_done
        self._taken += 1
        snap = self.ring.take(steps_done, self.state)
        if self._copied_at_once:
            self.ring.fence()
        if self._loop_scheduler_pending or self.state.averaged or after_recorded:
            self.complete_snapshot()  # (a rollback's snapshot follows the step's own at once)
            self._awaiting = (snap, to_disk)
        elif to_disk:
            self.disk.save_async(snap)  # type: ignore[union-attr]
        return snap

    @property
    def _loop_scheduler_pending(self) -> bool:
        return self.loop_steps_scheduler and self.state.scheduler is not None

    def complete_snapshot(self) -> None:
        """Give the newest snapshot the scheduler, and the optimizer's groups, as the loop has left them since (see
        ``loop_steps_scheduler``), and the model averages the loop updated after the step (`TrainingState.averaged`),
        and write it to disk if it is due there. Called at the start of each step and at close."""
        if self._awaiting is None:
            return
        snap, to_disk = self._awaiting
        self._awaiting = None
        if self._loop_scheduler_pending:
            snap.plain["scheduler"] = copy.deepcopy(self.state.scheduler.state_dict())  # type: ignore[union-attr]
            groups = copy.deepcopy(self.state.optimizer.state_dict()["param_groups"])
            snap.skeleton["param_groups"] = groups_in_mode_of(groups, snap.skeleton["param_groups"])
        if self.state.averaged:
            snap.plain["averaged"] = capture_averaged(self.state)
        if to_disk:
            self.disk.save_async(snap)  # type: ignore[union-attr]

    def fence(self) -> None:
        """Finish the snapshot in flight; called right before ``optimizer.step()`` mutates the tensors."""
        self.ring.fence()

    # --- rollback -----------------------------------------------------------------------------------
    def rollback(
        self, step: int, onset: int, findings: tuple[Finding, ...], rollbacks_in_window: int
    ) -> RollbackResult | None:
        """Restore the newest snapshot from before the trouble's onset (``onset``, or an open warning's earlier one:
        see the module docstring) and apply actions; None when there is none."""
        snap, passed_over, onset, onset_from = self._target(step, onset, findings)
        if snap is None:
            if passed_over:
                raise RecoveryExhausted("no snapshot can restore the state: " + "; ".join(passed_over))
            return None
        actions = choose_actions(findings, rollbacks_in_window, calm_before=self._calm_before(step))
        router_groups = router_param_groups(self.state.model, self.state.optimizer) if router_caused(findings) else ()
        scale = min(self.lr_scales(step)[i] for i in router_groups) if router_groups else self.lr_scale(step)
        if "lr_backoff" in actions and scale * self.config.lr_backoff < self.config.min_lr_scale:
            raise RecoveryExhausted(
                f"the LR is already scaled by {scale:.3g} after {self.rollbacks} rollback(s); "
                f"another back-off would take it below min_lr_scale={self.config.min_lr_scale:g}"
            )
        restore(self.state, snap.tensors, snap.skeleton, snap.plain, resume=False, fixed=snap.fixed)
        self.ring.drop_after(snap.step)
        self.rollbacks += 1
        reseed(1_000_003 * snap.step + 7_919 * step + self.rollbacks + _stream_of_this_process())
        done = apply_actions(
            actions,
            self.actions,
            self.state.optimizer,
            step=step,
            lr_backoff=self.config.lr_backoff,
            cooldown_steps=self.config.cooldown_steps,
            findings=findings,
            router_groups=router_groups,
        )
        self._last_trouble = step
        self._episode, self._unproven = None, (step, snap.step)
        if self.writes_disk:
            # The disk snapshots newer than the restored one belong to the timeline just abandoned: a run killed
            # now must not resume into it. The restored state, actions applied, is the new timeline's start.
            self.disk.drop_after(snap.step)  # type: ignore[union-attr]
            self._take(step + 1, to_disk=True, after_recorded=True)
        return RollbackResult(snapshot=snap, actions=done, passed_over=passed_over, onset=onset, onset_from=onset_from)

    def _target(
        self, step: int, onset: int, findings: tuple[Finding, ...]
    ) -> tuple[Snapshot | None, list[str], int, str]:
        """The snapshot to restore, the newer ones passed over, the onset it is from before, and why that onset."""
        onset_from = ""
        episode = self._open_episode(step, findings)
        if episode is not None and episode[0] < onset:
            snap, passed_over = self._usable_snapshot(self._rollback_point(episode[0]))
            if snap is not None:
                onset, onset_from = episode[0], f"the onset of {episode[1]}, still open"
            else:
                onset_from = (
                    f"the critical finding's own: no snapshot kept is from before the onset (step {episode[0]}) of "
                    f"{episode[1]}, still open"
                )
        # The value at step k comes from the state at the start of step k, made by update k - 1: the margin
        # steps back past that update. Nothing precedes the starting state, which no update has touched.
        point = self._rollback_point(onset)
        if self._unproven is not None:
            rolled_back_at, restored = self._unproven
            still_bad = (
                f"the snapshot of step {restored} restored at step {rolled_back_at} was still in trouble: no update "
                "ran on it before this rollback"
            )
            point = min(point, restored - 1)
            snap, passed_over = self._usable_snapshot(point)
            if snap is None:
                raise RecoveryExhausted("; ".join([f"{still_bad}, and no older snapshot is kept", *passed_over]))
            return snap, passed_over, min(onset, restored), f"{onset_from}; {still_bad}" if onset_from else still_bad
        damaged = _non_finite_parameters(findings)
        if damaged is not None:  # the snapshot of that step holds them as they were read: restore an older one
            point = min(point, damaged[0] - 1)
        snap, passed_over = self._usable_snapshot(point)
        if snap is None and damaged is not None and not passed_over:
            raise RecoveryExhausted(self._nothing_older(*damaged))
        return snap, passed_over, onset, onset_from

    def _nothing_older(self, step: int, names: str) -> str:
        """Why non-finite parameters found at ``step`` cannot be rolled back: no snapshot older than that state."""
        why = f"the parameters ({names}) were non-finite in the state step {step} started from, and no older snapshot"
        if self._taken <= 1:  # only the run's first state was ever kept: it was broken before keel's first step
            return (
                f"{why} exists: the model was non-finite before the first update (check its initialisation or the "
                "checkpoint it loaded)"
            )
        return f"{why} is kept"

    def _calm_before(self, step: int) -> bool:
        """Whether the steps before ``step`` were healthy updates: no warning open, no skip or critical finding
        within ``quiet_steps``, and no rollback not yet followed by an update (`choose_actions`)."""
        return (
            self._open_episode(step, ()) is None
            and step - self._last_trouble > self.config.quiet_steps
            and self._unproven is None
        )

    def _usable_snapshot(self, point: int) -> tuple[Snapshot | None, list[str]]:
        """The newest snapshot from before ``point`` that can restore the live state, and why each newer one cannot
        (it left out a parameter that may have changed since: `keel.recover.fixed`)."""
        passed_over: list[str] = []
        live: dict[str, Any] | None = None
        trained: set[str] = set()
        for snap in self.ring.before(point):
            if not snap.fixed:
                return snap, passed_over
            if live is None:
                live, trained = model_tensors(self.state), trained_keys(self.state)
            why = stale_reason(snap.fixed, live, trained, self.ring.last_trained, snap.step)
            if why is None:
                return snap, passed_over
            passed_over.append(f"the snapshot of step {snap.step} cannot: {why}")
        return None, passed_over

    def _rollback_point(self, onset: int) -> int:
        return max(self.first_step, onset - self.config.rollback_margin)

    def resume(self, of_run: str | None = None, *, run_steps: int = 0, at_most: int | None = None) -> Snapshot | None:
        """Restore everything, data position included, from the newest good disk snapshot of the run ``of_run``
        (None: of any run), and put it in the memory ring.

        Args:
            of_run: The id of the run being continued.
            run_steps: The steps that run recorded: when it left no snapshot at all, a warning says that it starts
                again from step 0.
            at_most: Only from a snapshot of this step or earlier (the newest step every rank holds).

        Raises:
            ValueError: The snapshot was taken with another setup (model parameters, optimizer class or groups,
                scheduler class); nothing has been restored.
        """
        if self.disk is None:
            return None
        snap = self.disk.load_newest(of_run, at_most=at_most)
        if snap is None:
            if run_steps > 0 and not self.disk.found:
                warnings.warn(
                    f"resume=True: the run in {self.disk.directory.parent} holds {run_steps} steps but no "
                    "disk snapshot to continue from (RecoveryConfig.disk_every writes them): it starts "
                    "again from step 0, and its store's rows of those steps are replaced",
                    KeelWarning,
                    stacklevel=3,
                )
            return None
        differences = setup_differences(snap, self.state) or fixed_differences(snap.fixed, model_tensors(self.state))
        if differences:
            raise ValueError(
                f"resume: the snapshot of step {snap.step} in {self.disk.directory} was taken with "
                f"another setup: {describe_differences(differences)}; allowed: resume with the model, "
                "optimizer and scheduler the run was started with, or start a new run there "
                "(overwrite=True) or in another run_dir"
            )
        restore(self.state, snap.tensors, snap.skeleton, snap.plain, resume=True, fixed=snap.fixed)
        resumed = self.ring.take(snap.step, self.state)  # the resumed state is the first to roll back to
        resumed.plain["averaged"] = copy.deepcopy(snap.plain.get("averaged", {}))  # registered later (Guard.track)
        # and the older ones on disk after it: a trouble whose onset is before the resumed snapshot (a NaN burst the
        # run was killed in) is rolled back as far as the uninterrupted run would, not aborted
        for older in self.disk.load_older(self.config.keep_in_memory - 1):
            self.ring.add_older(older)
        self._resumed_tracked = sorted(snap.plain["tracked"])
        self._resumed_averaged = sorted(snap.plain.get("averaged", {}))
        return snap

    def newest_on_disk(self) -> int:
        """The step of the newest finished disk snapshot, good or not, of any run (-1: none; no disk tier)."""
        folders = self.disk.complete() if self.disk is not None else []
        return snapshot_step(folders[-1]) or 0 if folders else -1

    def _check_tracked(self) -> None:
        """At the first step after a resume: warn about data positions the snapshot holds that nothing was
        registered for with ``Guard.track`` (the data starts over), and registered ones it does not hold; and about
        model averages it holds that were not registered."""
        saved, registered = set(self._resumed_tracked or ()), set(self.state.tracked)
        self._resumed_tracked = None
        for name in sorted(saved - registered):
            warnings.warn(
                f"resume: the snapshot holds the data position {name!r}, but it was not registered with "
                f"guard.track(..., name={name!r}) before the first step: that data starts from its "
                "beginning instead of where the run stopped",
                KeelWarning,
                stacklevel=4,
            )
        for name in sorted(registered - saved):
            warnings.warn(
                f"resume: guard.track(..., name={name!r}) registered a data position that is not in the "
                "snapshot: it starts from its beginning",
                KeelWarning,
                stacklevel=4,
            )
        for name in sorted(set(self._resumed_averaged) - set(self.state.averaged)):
            warnings.warn(
                f"resume: the snapshot holds the model average {name!r} (an EMA of the weights), but it was not "
                f"registered with guard.track(ema, name={name!r}) before the first step: the loop's average goes "
                "on from what the loop built, not from where the run stopped",
                KeelWarning,
                stacklevel=4,
            )

    # --- actions in force ---------------------------------------------------------------------------
    def lr_scale(self, step: int) -> float:
        return current_lr_scale(self.actions, step, self.config.cooldown_steps)

    def lr_scales(self, step: int) -> list[float]:
        """Each param group's LR scale at ``step`` (a router group may have its own: `keel.recover.actions`)."""
        groups = len(self.state.optimizer.param_groups)
        return group_lr_scales(self.actions, step, self.config.cooldown_steps, groups)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rollbacks": self.rollbacks,
            "taken": self._taken,
            "last_snapshot": self._last_snapshot,
            "last_trouble": self._last_trouble,
            "last_warning": self._last_warning,
            "episode": self._episode,
            "unproven": self._unproven,
            "first_step": self.first_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks, self._taken = int(state["rollbacks"]), int(state["taken"])
        self._last_snapshot, self._last_trouble, self._last_warning = (
            float(state[k]) for k in ("last_snapshot", "last_trouble", "last_warning")
        )
        # snapshots written before keel tracked the open warnings and unproven rollbacks hold neither
        episode, unproven = state.get("episode"), state.get("unproven")
        self._episode = (int(episode[0]), str(episode[1])) if episode is not None else None
        self._unproven = (int(unproven[0]), int(unproven[1])) if unproven is not None else None
        self.first_step = int(state.get("first_step", 0))  # (a snapshot from before keel kept it: a run from 0)

    def close(self) -> None:
        self.complete_snapshot()
        self.ring.close()
        if self.disk is not None:
            self.disk.wait()


def _non_finite_parameters(findings: tuple[Finding, ...]) -> tuple[int, str] | None:
    """The step whose starting state held the non-finite parameters found among ``findings``, and their names; None
    when none. Read at step k, that is k; found right after update k (`keel.guard.weights_check`), it is the state
    step k + 1 starts from (the finding's ``onset_step``): the snapshot of step k is still good, and restoring an
    older one undid an update for nothing (an update at step 0 aborted the run, no older snapshot being kept)."""
    for f in findings:
        if f.kind == "non_finite" and f.signal == keys.PARAM_NORM:
            names = f.evidence.get("parameters")
            return _onset_of(f), ", ".join(map(str, names)) if isinstance(names, list) and names else "not named"
    return None


def _onset_of(finding: Finding) -> int:
    """When the trouble a finding reports began: its ``onset_step`` evidence, else (absent or None) its own step."""
    onset = finding.evidence.get("onset_step")
    return int(onset) if isinstance(onset, (int, float)) and math.isfinite(onset) else finding.step


def _stream_of_this_process() -> int:
    """A number of the restored torch RNG state: the ranks of a distributed run, seeded apart by the loop, stay apart
    after a rollback's reseed (and ranks seeded alike, as tensor-parallel peers, stay alike). With the same number
    for every rank, every rank drew the same batches and dropout masks for the rest of the run (reviewer V10)."""
    return zlib.crc32(torch.get_rng_state().numpy().tobytes())
