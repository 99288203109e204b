"""The phases a run store declares (`Guard.phase`: task or data-mix switches), used as the live Guard uses them.

A continual-learning run's store keeps its switches in its meta (``phases``: ``{index, name, step}`` in order,
``step`` the first step trained in the phase) and its evals (``evals``: ``{name: {every, task, goal}}``). The live
Guard does two things with them, and `keel doctor` on the store does the same:

- At each switch the detectors of the training loss and gradient norm (spikes, divergence) start new baselines:
  the new task's data has its own loss level, and the jump to it is not a spike (`rebaseline`, as
  `keel.guard.evaluation.Evaluation`'s own). The doctor does it before the first observation at or after the
  switch's step — each time its stream of observations crosses that step, a replay after a restart too.
- The stability-gap detector is told the phases and each eval's goal and task (`note_declared`): it judges
  only the evals of tasks trained before a switch, in the direction the eval declared (an error rate falls
  when the model gets better; its name does not say so). Only an eval of one number (``eval/<name>``) is told:
  a dict eval's headline is its first metric, and the store does not keep the dict's order.

The meta of a store is untrusted input: a malformed entry is left out and noted, and the run is read without it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel.detect import Detector
from keel.detect.detector import restarts_at_switch
from keel.detect.stability_gap import KIND as STABILITY_GAP
from keel.doctor.blocks import Broken, label
from keel.doctor.table import MAX_STEP

START_PHASE = "start"  # `keel.guard.evaluation.START_PHASE`: the unnamed steps before a first phase after step 0
GOALS = ("max", "min")


@dataclass(kw_only=True)
class Declared:
    """What a store declares about its phases and evals.

    Attributes:
        phases: ``(first step, name)`` of each phase in order; ``None`` names the unnamed steps before the first
            declared phase (the Guard's implicit ``start`` phase 0). Every phase after the first is a switch.
        evals: Eval key (``eval/<name>``) → (goal, task) for evals of one number.
    """

    phases: list[tuple[int, str | None]] = field(default_factory=list)
    evals: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    @property
    def switches(self) -> list[int]:
        """The first step of each phase after the first: where the Guard restarted its baselines."""
        return [step for step, _ in self.phases[1:]]

    def crossed(self, before: int | None, step: int) -> bool:
        """Whether going from an observation at step ``before`` (None: none yet) to one at ``step`` crosses a
        switch: one at a step in (before, step]."""
        if before is None or step <= before:
            return False
        switches = self.switches
        return bisect.bisect_right(switches, step) > bisect.bisect_right(switches, before)

    def summary(self, findings: Sequence[Finding]) -> list[dict[str, Any]]:
        """The phases as the doctor's summary lists them: index (names numbered in order of first appearance, as
        the Guard numbers them), name, first step, and the evals with a stability gap (a warning) after the switch
        into the phase."""
        gaps: dict[int, list[str]] = {}
        for f in findings:
            if f.kind == STABILITY_GAP and f.severity == "warning" and isinstance(f.evidence.get("switch_step"), int):
                gaps.setdefault(f.evidence["switch_step"], []).append(f.signal)
        index: dict[str | None, int] = {}
        return [
            {
                "index": index.setdefault(name, len(index)),
                "name": START_PHASE if name is None else name,
                "step": step,
                "stability_gaps": sorted(set(gaps.get(step, []))),
            }
            for step, name in self.phases
        ]


def read_declared(meta: dict[str, Any], signal_keys: Sequence[str], notes: list[str]) -> Declared | None:
    """The phases and evals a store's ``meta`` declares (None: no phases); what is malformed is noted."""
    raw = meta.get("phases")
    if raw is None:
        return None
    phases = _phases(raw)
    if phases is None:
        notes.append("the store's 'phases' is not a list of {index, name, step} in step order; phases are not used")
        return None
    if not phases:
        return None
    evals, dropped = _evals(meta.get("evals", {}), set(signal_keys))
    if dropped:
        notes.append(f"the store's 'evals': {dropped} entr(ies) without a goal of 'max'/'min' were left out")
    return Declared(phases=phases, evals=evals)


def _phases(raw: Any) -> list[tuple[int, str | None]] | None:
    if not isinstance(raw, list):
        return None
    phases: list[tuple[int, str | None]] = []
    for entry in raw:
        if not isinstance(entry, dict):
            return None
        index, name, step = entry.get("index"), entry.get("name"), entry.get("step")
        if type(index) is not int or type(step) is not int or not isinstance(name, str) or not 0 <= step < MAX_STEP:
            return None  # a step as the store's steps are kept: int64, under 2**61
        if phases and step <= phases[-1][0]:
            return None
        phases.append((step, None if name == START_PHASE and index == 0 else name))
    return phases


def _evals(raw: Any, signal_keys: set[str]) -> tuple[dict[str, tuple[str, str | None]], int]:
    """Eval key → (goal, task) of the evals of one number; and how many entries were malformed."""
    if not isinstance(raw, dict):
        return {}, 1
    evals, dropped = {}, 0
    for name, spec in raw.items():
        goal = spec.get("goal") if isinstance(spec, dict) else None
        task = spec.get("task") if isinstance(spec, dict) else None
        if goal not in GOALS or not (task is None or isinstance(task, str)):
            dropped += 1
            continue
        key = keys.EVAL_PER_NAME + str(name)
        if key in signal_keys:
            evals[key] = (goal, task)
    return evals, dropped


def note_declared(detectors: Sequence[Detector], declared: Declared | None) -> None:
    """Tell the detectors that take them (the stability gap) the phases and each eval's goal and task, as the
    Guard does (`keel.guard.evaluation.Evaluation`)."""
    if declared is None:
        return
    for detector in detectors:
        note_phases = getattr(detector, "note_phases", None)
        if note_phases is not None:
            note_phases(list(declared.phases))
        note_eval = getattr(detector, "note_eval", None)
        if note_eval is not None:
            for key, (goal, task) in declared.evals.items():
                note_eval(key, goal, task)


def rebaseline(detectors: Sequence[Detector], broken: Broken, step: int) -> None:
    """Put each working detector that `restarts_at_switch` back to the state of a fresh one with its config, before the
    observation at ``step``; one whose state cannot be set is switched off, as any detector that raises."""
    for i, detector in enumerate(detectors):
        if i in broken or not restarts_at_switch(detector):
            continue
        try:
            fresh: Any = type(detector)(detector.config)  # type: ignore[attr-defined,call-arg]
            detector.load_state_dict(fresh.state_dict())
        except Exception as exc:  # noqa: BLE001 - a bug in a detector, as in keel.doctor.blocks
            broken.add(
                i,
                step,
                f"the {label(detector)} detector raised {type(exc).__name__} when its baseline was "
                f"restarted at the phase switch before step {step}; it was switched off",
            )
