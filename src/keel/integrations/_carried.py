"""keel's own settings that a trainer's checkpoint carries (the Hugging Face and Lightning callbacks).

A rollback backs the learning rate off (``lr_backoff``), tightens the gradient clip (``tighten_clipping``) or cuts a
router group's LR; the escalation ladder counts the rollbacks and skips. Both are the run's history
(`keel.recover.TrainingState.history`), which keel's own ``resume=True`` restores from its snapshot. A resume from the
*trainer's* checkpoint (``resume_from_checkpoint``, ``ckpt_path``) starts a new keel run whose history begins empty:
after a rollback that cut the LR ×0.1 and clipped at 0.6, the resumed run trained at the full LR with the user's clip
of 1.0 again, and nothing said (session 14's closing note). Each adapter keeps `kept_history` in the checkpoint beside
the ``max_steps`` extension (`keel.integrations._run_length`) and gives it to `restore_history` when the resumed run
starts; what is in force again is said on the ``keel`` logger, as the extension is.

Carried (`CARRIED`): the actions in force (``actions``) and the escalation ladder (``escalation``): a resumed run backs
off, clips and escalates as the uninterrupted one would. Not carried: the recovery's own counters (its snapshot
schedule and first step belong to keel's snapshots, which the new run does not have) and the phases and evals so far
(``evaluation``).

The detectors' baselines are carried too (`kept_baselines`, `restore_baselines`), as a snapshot holds them: a run
killed after an update that damaged it (an LR surge at update 13 of a run_clm-shaped run, loss 3.7 → 16) and resumed
from the checkpoint of update 15 started its detectors afresh on the damaged level, so the divergence the uninterrupted
run rolled back at update 28 (ending at loss 3.7) was never seen: the resumed run ended at loss 14, silently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from keel.guard import Guard
from keel.guard.run_dir import valid_run_id
from keel.guard.summary import plural
from keel.integrations._run_length import say
from keel.recover.actions import HISTORY_KEY as ACTIONS
from keel.recover.state import load_states, plain_copy, plain_states
from keel.store.reader import RunReader
from keel.store.schema import STORE_NAME

CARRIED = (ACTIONS, "escalation")


def kept_history(guard: Guard) -> dict[str, Any]:
    """The parts of ``guard``'s history a trainer's checkpoint carries, as plain (JSON-able) data."""
    history = guard.state.history
    return plain_states({key: history[key] for key in CARRIED if key in history})


def kept_baselines(guard: Guard) -> dict[str, Any]:
    """The detectors' baselines (`keel.recover.TrainingState.components`), as plain data, by their snapshot key."""
    return plain_states(guard.state.components)


def restore_baselines(guard: Guard, kept: object) -> None:
    """Load what `kept_baselines` kept into the detectors with the same key (the same detector at the same place), as a
    snapshot's restore does (a ``load_state_dict`` that refuses raises: the adapter's ``components.call`` records it).

    Raises:
        ValueError: ``kept`` is not a dict.
    """
    if not isinstance(kept, dict):
        raise ValueError(f"keel's entry in the checkpoint: baselines={kept!r}; allowed: a dict detector key → state")
    load_states(guard.state.components, kept)


def restore_history(guard: Guard, kept: object, step: int) -> None:
    """At a resume from the trainer's checkpoint, at step ``step``: load what `kept_history` kept into ``guard``'s
    history and say what is in force again (nothing when the checkpoint's run had changed nothing). A part this run
    has no place for (its policy takes no actions) is said to be left out.

    Raises:
        ValueError: ``kept`` is not what `kept_history` returns (a hand-edited checkpoint); the history is left as
            it was.
    """
    if not isinstance(kept, dict):
        raise ValueError(f"keel's entry in the checkpoint: history={kept!r}; allowed: a dict of {CARRIED}")
    history = guard.state.history
    for key in CARRIED:
        if key in kept and key in history:
            _load(history[key], kept[key])
    said = _in_force(guard, step) + _left_out(guard, kept)
    if said:
        say(guard, f"resumed at step {step} from a checkpoint saved after keel's rollbacks: {'; '.join(said)}")


def _load(part: Any, state: Any) -> None:
    """``part.load_state_dict(state)``, all or nothing."""
    before = part.state_dict()
    try:
        part.load_state_dict(plain_copy(state))
    except Exception as exc:
        part.load_state_dict(before)
        raise ValueError(f"keel's entry in the checkpoint: {state!r} ({type(exc).__name__}: {exc})") from None


def _in_force(guard: Guard, step: int) -> list[str]:
    """What keel's actions change in this run from ``step`` on, in words (empty: nothing)."""
    actions = guard.state.history.get(ACTIONS)
    if actions is None:
        return []
    scales = guard.actuator.lr_scales(step)
    said = []
    if any(s != 1.0 for s in scales):
        lr = f"{scales[0]:.3g}" if len(set(scales)) == 1 else f"[{', '.join(f'{s:.3g}' for s in scales)}] by group"
        said.append(f"the LR × {lr}")
    limit = getattr(actions, "max_grad_norm", None)
    if limit is not None:
        said.append(f"the gradient clipped at {limit:.3g}")
    if not said:
        return []
    said = [f"keel's actions are in force again (kept in the checkpoint): {', '.join(said)}"]
    rollbacks = len(getattr(guard.state.history.get("escalation"), "rollback_steps", ()))
    if rollbacks:
        said.append(f"the escalation counts {plural(rollbacks, 'earlier rollback', count=True)}")
    return said


def _left_out(guard: Guard, kept: dict[str, Any]) -> list[str]:
    """The checkpoint's actions this run cannot apply (its policy has no recovery), in words."""
    actions = kept.get(ACTIONS)
    if ACTIONS in guard.state.history or not isinstance(actions, dict):
        return []
    changed = actions.get("lr_scale", 1.0) != 1.0 or actions.get("max_grad_norm") is not None
    changed = changed or bool(actions.get("group_lr_scale"))
    if not changed:
        return []
    return [
        f"the checkpoint's run had backed off the LR or tightened the clip (keel's actions {actions}), which policy "
        f"{guard.policy!r} does not apply: this run trains at the schedule's LR and the Trainer's clip"
    ]


def earlier_checkpoints_advice(guard: Guard, start: int, folder: object, pattern: str) -> None:
    """When a run resumed from the trainer's checkpoint aborts, say which of the trainer's checkpoints are older than
    the one it started from: keel's snapshots begin there, so trouble that began before it (an update that damaged the
    run before the checkpoint was saved, with keel's rollback after it) cannot be undone in this run — a
    run_clm-shaped run killed two updates after an LR surge and relaunched aborted twice from the damaged checkpoint,
    with nothing said of the one before it. ``start``: the step the run started from (0: not a resume, nothing
    said); ``folder``: where the trainer keeps its checkpoints; ``pattern``: a regex whose group 1 is a checkpoint's
    step in its name (``checkpoint-(\\d+)``, Lightning's ``step=(\\d+)``)."""
    if not start:
        return
    older = []
    if isinstance(folder, (str, Path)) and Path(folder).is_dir():
        found = ((m, p.name) for p in Path(folder).iterdir() if (m := re.search(pattern, p.name)))
        older = [name for step, name in sorted((int(m.group(1)), name) for m, name in found) if step < start]
    which = f"one of them, newest first: {', '.join(older[::-1][:3])}" if older else "one if any is kept"
    say(
        guard,
        f"this run started from the trainer's checkpoint at step {start}, and keel cannot go back before it: if the "
        f"trouble began before that checkpoint was saved, resume from an earlier checkpoint ({which}) with a new "
        "run_dir",
    )


def continued_step(
    run_dir: str | None, *, step: int, written_by: object, job_folder: object, resume: bool, resumed_by: str
) -> int | None:
    """The step a trainer's run continues the keel run in ``run_dir`` from (`Guard`'s ``continue_at``), rather than
    refusing it as "a previous run" — or deleting it under ``overwrite=True``, which left a preempted job's store
    holding its last segment only (reviewer R's R8); None: no continuation (``resume``: keel's own resume keeps its
    meaning).

    - The trainer resumed from its checkpoint at ``step`` > 0, whose keel entry names (``written_by``) the run id of
      the store in ``run_dir``: ``step`` (the store drops its rows from there on: the trainer does them again).
    - The trainer starts at step 0 and the store holds an unfinished run of the same ``job_folder`` (the trainer's
      output folder, in the run's config): a job killed before its first checkpoint, started again with the same
      command: 0 (its rows are all dropped, its id kept).

    Raises:
        ValueError: The checkpoint was written by a keel run and the store in ``run_dir`` holds another one.
    """
    if run_dir is None or resume:
        return None
    held = _run_in(str(run_dir))
    if held is None:
        return None  # no run there (a new one: start_at), or one keel cannot read (the Guard's claim says so)
    if not step:
        same_job = isinstance(job_folder, str) and _job_folder(held) == job_folder
        return 0 if same_job and held.get("status") != "finished" else None
    checkpoint_run = valid_run_id(written_by)
    if checkpoint_run is None:
        return None  # an older keel's checkpoint, or a foreign entry: the Guard's claim refuses the run as before
    if checkpoint_run != held["run_id"]:
        raise ValueError(
            f"KeelCallback: {resumed_by} resumed at step {step} from a checkpoint of keel run {checkpoint_run}, but "
            f"run_dir={str(run_dir)!r} holds keel run {held['run_id']}; allowed: the run_dir of the run that wrote "
            "the checkpoint (keel continues it there), or a new run_dir (a new keel run from this step)"
        )
    return int(step)


def continued_line(run_id: str, run_dir: str, step: int) -> str:
    """The one line said when a trainer's run continues the keel run in its run_dir (`continued_step`)."""
    if not step:
        return (
            f"keel run {run_id[:8]} in {run_dir} was this job's, stopped before its first checkpoint; the trainer "
            "starts over at step 0, and so does that run (its rows are replaced)"
        )
    return (
        f"the trainer resumed from its checkpoint at step {step}, written by keel run {run_id[:8]}: keel continues "
        f"that run in {run_dir} (its rows of steps {step} on are dropped: the trainer does them again)"
    )


def _run_in(run_dir: str) -> dict[str, Any] | None:
    """The meta of the run store in ``run_dir`` (read-only) when it names a run id; None without a store, or one keel
    cannot read (the Guard's claim then says what is wrong with it)."""
    if not (Path(run_dir) / STORE_NAME).is_file():
        return None
    try:
        with RunReader(run_dir) as reader:
            meta = reader.meta()
    except Exception:  # a damaged or foreign store: refused by the Guard's claim, with its own message
        return None
    return meta if valid_run_id(meta.get("run_id")) is not None else None


def _job_folder(meta: dict[str, Any]) -> str | None:
    """The trainer's output folder a run store's run was trained with, from its config (the HF callback's
    ``args.output_dir``, the Lightning callback's ``default_root_dir``); None when it does not say."""
    config = meta.get("config")
    if not isinstance(config, dict):
        return None
    args = config.get("args")
    folder = args.get("output_dir") if isinstance(args, dict) else config.get("default_root_dir")
    return folder if isinstance(folder, str) else None
