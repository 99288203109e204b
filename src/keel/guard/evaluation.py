"""Evaluation during training: scheduled evals, evals computed elsewhere, and phases (task / data-mix switches).

`Guard.evaluate`, `Guard.record_eval` and `Guard.phase` delegate here. A scheduled eval runs after the step ``s``
with ``(s + 1) % every == 0`` — never before the first step: record the starting model with `Guard.record_eval`
if you want it — on the model as that step's update left it, under ``torch.no_grad()`` with ``model.eval()``,
and puts everything back: each submodule's train/eval mode, and the random state (torch's CPU and initialised
CUDA generators, Python's ``random``, NumPy's global generator), so a run with evals draws the same random numbers
as the run without them. Its values are signals of step ``s``: ``eval/<name>`` (one number) or
``eval/<name>/<metric>`` (a dict). Then the detectors that read evals (`keel.detect.stability_gap`) see them, and
the continual metrics (`keel.detect.continual_metrics`) are recomputed from the evals tied to tasks.

An eval function that raises or returns something else than a number, a 0-d tensor, a dict of those or a 1-d
tensor of per-example scores is recorded once as a ``keel_error`` finding and switched off; training goes on.

Where per-example scores go (`EvalListener`): a 1-d tensor result is recorded as its mean and handed, with the
rest of the result, to every listener in `Evaluation.listeners` (e.g. an eval-stability estimator); a listener may
return more signals to record at the same step.

Phases: ``phase(name)`` takes effect from the next step. The steps train on phase ``phase/index`` (0, 1, 2, …, in
the order names first appear; going back to a name takes its index again), recorded at every step it changes and
at step 0; the switches are kept in the run's meta as ``phases`` (a list of ``{index, name, step}``), and the evals
as ``evals`` (``{name: {every, task, goal}}``), for the report and `keel doctor`. A rollback does not undo a phase.
At a switch, the detectors of the training loss and gradient norm (spikes, divergence) start new baselines: the new
data has its own loss level (the phase's meta entry lists them as ``rebaselined``).
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal, Protocol, TypeGuard

import numpy as np
import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.errors import KeelWarning
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel.detect.continual_metrics import TaskEval, continual_metrics
from keel.detect.detector import restarts_at_switch
from keel.detect.eval_stability import EvalStability
from keel.detect.scan import ReadsKeys
from keel.guard.components import Components, checked_findings, detector_label
from keel.guard.recorder import Recorder

Goal = Literal["max", "min"]
GOALS: tuple[Goal, ...] = ("max", "min")
START_PHASE = "start"  # the name of the steps before the first `phase` call, when that call comes after step 0
_EVAL_READS = (keys.EVAL_PER_NAME, keys.PHASE_INDEX)  # a detector reading one of these is fed each eval round


@dataclass(kw_only=True)
class EvalSpec:
    """One named evaluation.

    Attributes:
        name: Its name: signals ``eval/<name>`` or ``eval/<name>/<metric>``. No ``/`` (it would split the key).
        fn: ``fn(model)`` → a number, a 0-d tensor, a dict of metric → number / 0-d tensor, or a 1-d tensor of
            per-example scores; ``None`` for evals recorded by `Guard.record_eval`.
        every: Run after every ``every``-th step (``None`` with ``fn=None``).
        task: The phase (`Guard.phase` name) this eval measures, for the continual metrics; ``None``: none.
        goal: ``"max"`` when higher is better (accuracy), ``"min"`` when lower is (a loss).
    """

    name: str
    fn: Callable[[nn.Module], Any] | None = None
    every: int | None = None
    task: str | None = None
    goal: Goal = "max"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name:
            raise ValueError(f"evaluate(name={self.name!r}); allowed: a non-empty str without '/', e.g. 'val'")
        if self.fn is not None and not callable(self.fn):
            raise ValueError(f"evaluate({self.name!r}, fn={_short(self.fn)}); allowed: a callable fn(model)")
        if self.fn is not None and (not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1):
            raise ValueError(f"evaluate({self.name!r}, every={self.every!r}); allowed: an int >= 1 (steps)")
        if self.task is not None and (not isinstance(self.task, str) or not self.task.strip()):
            raise ValueError(f"evaluate({self.name!r}, task={self.task!r}); allowed: None or a phase name (a str)")
        if self.goal not in GOALS:
            raise ValueError(f"evaluate({self.name!r}, goal={self.goal!r}); allowed: {', '.join(map(repr, GOALS))}")

    def describe(self) -> dict[str, Any]:
        return {"every": self.every, "task": self.task, "goal": self.goal}


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """What one eval gave at one step, as listeners see it.

    Attributes:
        step: The step after which it ran (or at which it was recorded).
        spec: The eval.
        values: Every signal it recorded, by key.
        headline: The key the continual metrics and the stability-gap detector follow: ``eval/<name>``, or the
            first metric of a dict.
        scores: The per-example scores (a 1-d float tensor on the CPU) when ``fn`` returned them, else ``None``.
    """

    step: int
    spec: EvalSpec
    values: dict[str, float]
    headline: str
    scores: Tensor | None = None


class EvalListener(Protocol):
    """Something that wants each eval result (e.g. per-example scores, to judge whether the eval can rank
    checkpoints). It may return more signals to record at the result's step, or ``None``."""

    def on_eval(self, result: EvalResult) -> Mapping[str, float] | None: ...


@dataclass(frozen=True, kw_only=True)
class Phase:
    index: int
    name: str
    step: int  # the first step trained in it
    rebaselined: tuple[str, ...] = ()  # the detectors that started new baselines at this switch

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "name": self.name, "step": self.step}
        if self.rebaselined:
            out["rebaselined"] = list(self.rebaselined)
        return out


class Evaluation:
    """The Guard's evaluations and phases: runs, records and feeds detectors. One per `Guard`.

    Attributes:
        specs: The evals by name.
        listeners: `EvalListener` objects handed every eval result (the place to hook eval-stability work).
        phases: The phase switches so far, in order.
        tracks: Each task-tied eval's headline values so far, by key, as the continual metrics read them.
    """

    def __init__(self, model: nn.Module, components: Components, recorder: Recorder) -> None:
        self.model, self.components, self.recorder = model, components, recorder
        self.specs: dict[str, EvalSpec] = {}
        # eval stability (BOSE) listens by default: monotonicity of every eval, rank τ of per-example scores
        self.listeners: list[EvalListener] = [EvalStability()]
        self.phases: list[Phase] = []
        self.tracks: dict[str, TaskEval] = {}
        self._announce: int | None = None  # the phase index to record at the next step, if it changes there
        self._restored = False  # load_state_dict was called (a resume found this state in the snapshot)
        self.restore_problem: str | None = None  # why the snapshot's evaluation state was not loaded, if it was not
        self._non_finite: set[str] = set()  # the evals whose headline metric is NaN/Inf now (said when it turned)

    # --- registering -------------------------------------------------------------------------------------
    def add(self, spec: EvalSpec) -> None:
        if spec.name in self.specs:
            raise ValueError(f"evaluate({spec.name!r}): an eval of that name exists; allowed: a new name")
        self.specs[spec.name] = spec
        self._write_meta()

    def phase(self, name: str, step: int) -> int:
        """Switch to phase ``name`` from ``step`` on; returns its index."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"phase(name={name!r}); allowed: a non-empty str, e.g. 'task_b'")
        if self.phases and self.phases[-1].step == step:  # two calls before one step: the first never took effect
            self.phases.pop()
        if not self.phases and step > 0:
            self.phases.append(Phase(index=0, name=START_PHASE, step=0))
            self.components.call("recorder", self.recorder.late, Observation(step=0, values={keys.PHASE_INDEX: 0.0}))
        if self.phases and self.phases[-1].name == name:
            return self.phases[-1].index
        known = {p.name: p.index for p in self.phases}
        index = known.get(name, len(known))
        rebaselined = self._rebaseline() if self.phases else ()
        self.phases.append(Phase(index=index, name=name, step=step, rebaselined=rebaselined))
        self._note_phases()
        self._announce = index
        self._write_meta()
        return index

    def after_rollback(self, restored_step: int) -> None:
        """A rollback restored the detectors' states of ``restored_step``: when that is before the current phase's
        switch, their loss and gradient-norm baselines are the phase before's again, while training goes on with
        this phase's data, so they are started anew as the switch did (the new task's loss was judged against the
        old one's: a false critical and a needless second rollback, helper C's C4)."""
        if self.phases and restored_step < self.phases[-1].step:
            self._rebaseline()

    def _note_phases(self) -> None:
        """Tell the detectors that take them (`note_phases`: the stability gap, which judges only the tasks
        trained before a switch) the phases so far; the implicit first phase names no task."""
        phases = [(p.step, None if p.name == START_PHASE and p.index == 0 else p.name) for p in self.phases]
        for detector in self.components.detectors:
            note = getattr(detector, "note_phases", None)
            if note is not None:
                self.components.call(detector_label(detector), note, phases)

    def _rebaseline(self) -> tuple[str, ...]:
        """Start new baselines for the one-signal detectors of the loss and gradient norm: the new phase's data has
        its own loss level, and a jump to it is not a spike or a divergence (under ``policy="recover"`` a class-
        incremental switch otherwise rolled back three times and aborted). Each such detector is reset to the state
        of a fresh one with its config; the names are kept in the phase's meta entry."""
        done = []
        for detector in self.components.detectors:
            if not restarts_at_switch(detector):
                continue  # only the one-signal baselines (spikes, divergence); e.g. the non-finite check needs none
            config, signal = detector.config, detector.config.signal  # type: ignore[attr-defined]
            label = detector_label(detector)
            fresh = self.components.call(label, lambda d=detector, c=config: type(d)(c).state_dict())
            if fresh is not None:
                self.components.call(label, detector.load_state_dict, fresh)
            if fresh is not None and self.components.enabled(label):
                done.append(f"{detector.name}({signal})")
        return tuple(done)

    @property
    def phase_index(self) -> int | None:
        return self.phases[-1].index if self.phases else None

    def host_values(self) -> dict[str, float]:
        """``phase/index`` for the step about to be recorded, when it starts a phase; else nothing."""
        if self._announce is None:
            return {}
        index, self._announce = self._announce, None
        return {keys.PHASE_INDEX: float(index)}

    # --- running -----------------------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """Run the evals due after ``step`` and record them (nothing to do: returns at once)."""
        due = [s for s in self.specs.values() if s.fn is not None and s.every and (step + 1) % s.every == 0]
        if not due:
            return
        results, after = [], self.components.step
        self.components.step = step  # an error is dated with the step the eval ran after
        try:
            for spec in due:
                result = self.components.call(f"eval:{spec.name}", self._run, spec, step)
                if result is not None:
                    results.append(result)
            if results:
                self._record(step, results)
        finally:
            self.components.step = after

    def record(self, step: int, metrics: Mapping[str, Any], *, name: str, task: str | None, goal: Goal) -> dict:
        """Record evals computed elsewhere (the HF Trainer's, Lightning's) at ``step``; returns the signals."""
        spec = EvalSpec(name=name, task=task, goal=goal)
        known = self.specs.get(name)
        if known is not None and (known.fn is not None or known.describe() != spec.describe()):
            raise ValueError(
                f"record_eval(name={name!r}, task={task!r}, goal={goal!r}): the eval {name!r} is "
                f"{'scheduled by evaluate()' if known.fn is not None else f'recorded with {known.describe()}'}; "
                "allowed: another name, or the same task and goal as before"
            )
        if not isinstance(metrics, Mapping) or not metrics:
            raise ValueError(f"record_eval(metrics={_short(metrics)}); allowed: a non-empty dict metric → number")
        try:
            values, headline, _ = _as_signals(name, dict(metrics))
        except TypeError as exc:
            raise ValueError(f"record_eval: {exc}") from None
        if known is None:
            self.add(spec)
        result = EvalResult(step=step, spec=spec if known is None else known, values=values, headline=headline)
        return self._record(step, [result])

    def _run(self, spec: EvalSpec, step: int) -> EvalResult:
        assert spec.fn is not None
        modes = [(m, m.training) for m in self.model.modules()]
        py_state, np_state = random.getstate(), np.random.get_state()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                self.model.eval()
                out = spec.fn(self.model)
                values, headline, scores = _as_signals(spec.name, out)  # reads the result while no_grad holds
        finally:
            for module, training in modes:
                module.training = training
            random.setstate(py_state)
            np.random.set_state(np_state)
        return EvalResult(step=step, spec=spec, values=values, headline=headline, scores=scores)

    def _record(self, step: int, results: list[EvalResult]) -> dict[str, float]:
        """Record one round of results at ``step``: their signals, the listeners' and the continual metrics';
        then feed the detectors that read evals, and record their findings."""
        values: dict[str, float] = {}
        for result in results:
            values.update(result.values)
            for i, listener in enumerate(self.listeners):
                more = self.components.call(f"eval listener:{i}:{type(listener).__name__}", listener.on_eval, result)
                values.update({str(k): float(v) for k, v in (more or {}).items()})
            if result.spec.task is not None:
                track = self.tracks.setdefault(result.headline, TaskEval(task=result.spec.task, goal=result.spec.goal))
                track.add(step, result.values[result.headline])
        if any(r.spec.task is not None for r in results):
            phases = [(p.step, p.name) for p in self.phases]
            values.update(self.components.call("continual metrics", continual_metrics, self.tracks, phases) or {})
        found = self._non_finite_evals(step, results) + self._detect(step, values, results)
        self.components.call("recorder", self.recorder.evaluation, Observation(step=step, values=values), found)
        return values

    def _non_finite_evals(self, step: int, results: list[EvalResult]) -> list[Finding]:
        """A warning when an eval's headline metric turns NaN or Inf (an fp16 eval that overflowed, an eval set that
        came out empty): the detectors that follow evals skip such a value, so the run read as healthy. Said again
        only after the metric was finite once more. A warning, not critical: the training signals decide."""
        found = []
        for result in results:
            value = result.values[result.headline]
            if math.isfinite(value):
                self._non_finite.discard(result.spec.name)
            elif result.spec.name not in self._non_finite:
                self._non_finite.add(result.spec.name)
                found.append(
                    Finding(
                        step=step,
                        kind="non_finite",
                        severity="warning",
                        signal=result.headline,
                        value=value,
                        evidence={"eval": result.spec.name, "non_finite": [result.headline]},
                        cause=f"The eval {result.spec.name!r} gave {value} for {result.headline} at step {step}.",
                        advice="Check the eval: an empty eval set, a division by zero in the metric, or a model "
                        "whose eval forward overflows in low precision (run the eval in float32).",
                    )
                )
        return found

    def _detect(self, step: int, values: dict[str, float], results: list[EvalResult]) -> list[Finding]:
        """Feed the round to the detectors that read evals, with the phase index of ``step`` (0 before any phase:
        the steps before a first `phase` call are its phase 0), so the order in which a step's observation and its
        evals arrive (``sync="deferred"`` lands a step's observation one step late) does not matter."""
        phase = next((p.index for p in reversed(self.phases) if p.step <= step), 0)
        obs = Observation(step=step, values={**values, keys.PHASE_INDEX: float(phase)})
        found: list[Finding] = []
        for detector in self.components.detectors:
            if not (isinstance(detector, ReadsKeys) and any(k in _EVAL_READS for k in detector.reads)):
                continue
            label = detector_label(detector)
            note = getattr(detector, "note_eval", None)
            if note is not None:  # the goal of each key: the headline's is the eval's, the other metrics unwatched
                for result in results:
                    for key in result.values:
                        watched = key == result.headline
                        goal, task = (result.spec.goal, result.spec.task) if watched else (None, None)
                        self.components.call(label, note, key, goal, task)
            found.extend(self.components.call(label, _detected, detector, obs) or [])
        return found

    # --- snapshot state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's evaluation history as plain data: the phases, each task-tied eval's values (the continual
        metrics' inputs), each listener's state (eval stability's kept checkpoints) and a phase index still to
        record. The evals themselves are code: a resumed loop registers them again with `Guard.evaluate`; their
        schedule follows the step, which the resume restores. The stability-gap detector's baselines are a
        detector's state, kept with the other detectors'."""
        return {
            "phases": [{**p.to_dict(), "rebaselined": list(p.rebaselined)} for p in self.phases],
            "tracks": {
                k: {"task": t.task, "goal": t.goal, "steps": list(t.steps), "values": list(t.values)}
                for k, t in self.tracks.items()
            },
            "listeners": {
                _listener_key(i, x): getattr(x, "state_dict")()  # noqa: B009 - optional: EvalListener has no state
                for i, x in enumerate(self.listeners)
                if hasattr(x, "state_dict")
            },
            "announce": self._announce,
        }

    def load_state_dict(self, state: Any) -> None:
        """Load a snapshot's evaluation history, whole or not at all; never raises.

        It is the run's history (`keel.recover.TrainingState.history`): a resume restores it, a rollback keeps the
        live one. A rollback goes back in model and optimizer but not in time — the steps after the snapshot were
        trained on their phase, and the evals measured then are what the model did then (steps are never reused),
        so the phases, the continual metrics' inputs and eval stability's checkpoints stay; only a run whose
        process ended needs them back. A state that does not have the shape `state_dict` writes (a damaged or
        hostile snapshot) is ignored: the evaluation state stays as it was, and `restore_problem` says why
        (`resumed` records it).
        """
        self._restored = True
        try:
            phases, tracks, announce = _parse_state(state)
            self._load_listeners(state.get("listeners", {}))
        except Exception as exc:  # noqa: BLE001 - what a snapshot holds must never stop a resume
            self.restore_problem = (
                f"the evaluation state in the snapshot is damaged and was ignored ({exc}); phases, the continual "
                "metrics' evals and eval stability start empty"
            )
            return
        self.phases, self.tracks, self._announce = phases, tracks, announce
        self._note_phases()
        self.restore_problem = None

    def _load_listeners(self, states: Any) -> None:
        """Each listener's state by `_listener_key`, all or none: a listener that refuses its state puts every
        listener loaded before it back."""
        if not isinstance(states, Mapping):
            raise TypeError(f"listeners: {_short(states)}; allowed: a dict of listener → state")
        done: list[tuple[Any, dict[str, Any]]] = []
        listeners: list[Any] = list(self.listeners)  # state_dict / load_state_dict are optional on a listener
        try:
            for i, listener in enumerate(listeners):
                key = _listener_key(i, listener)
                if key in states and hasattr(listener, "load_state_dict"):
                    before = listener.state_dict()
                    done.append((listener, before))
                    listener.load_state_dict(copy.deepcopy(states[key]))
        except Exception as exc:
            for listener, before in reversed(done):
                listener.load_state_dict(before)
            raise ValueError(f"listener {key}: {type(exc).__name__}: {exc}") from None

    def resumed(self, step: int) -> None:
        """After a resume from the snapshot of ``step``: say when the snapshot held no usable evaluation state (a
        snapshot of an older keel: a `KeelWarning` and the run's meta ``evaluation_restore``; a damaged one: also
        a ``keel_error`` finding), and write the restored phases to the run's meta."""
        problem = self.restore_problem
        if not self._restored:
            problem = (
                f"resume: the snapshot of step {step} holds no evaluation state (written before keel kept it): "
                "phases, the continual metrics' evals and eval stability start empty"
            )
        if problem is not None:
            warnings.warn(problem, KeelWarning, stacklevel=3)
            self.components.call("recorder", self.recorder.meta, {"evaluation_restore": problem})
            if self._restored:
                self.components.fail("evaluation state", step, ValueError(problem), disable=False)
        self._write_meta()

    def _write_meta(self) -> None:
        meta = {"evals": {n: s.describe() for n, s in self.specs.items()}, "phases": [p.to_dict() for p in self.phases]}
        self.components.call("recorder", self.recorder.meta, meta)


def _listener_key(index: int, listener: object) -> str:
    return f"{index}:{type(listener).__name__}"


def _parse_state(state: Any) -> tuple[list[Phase], dict[str, TaskEval], int | None]:
    """The phases, tracks and pending phase index of an evaluation ``state_dict``; ValueError/TypeError naming the
    first part that is not what `Evaluation.state_dict` writes."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{_short(state)} ({type(state).__name__}); allowed: a dict")
    raw_phases, raw_tracks = state.get("phases", []), state.get("tracks", {})
    if not isinstance(raw_phases, list):
        raise TypeError(f"phases: {_short(raw_phases)}; allowed: a list of {{index, name, step}}")
    phases: list[Phase] = []
    known: dict[str, int] = {}
    for raw in raw_phases:
        if not isinstance(raw, Mapping):
            raise TypeError(f"phase {_short(raw)}; allowed: a dict {{index, name, step}}")
        index, name, step = raw.get("index"), raw.get("name"), raw.get("step")
        rebaselined = raw.get("rebaselined", [])
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"phase name {_short(name)}; allowed: a non-empty str")
        if not _count(index) or index != known.get(name, len(known)):
            raise ValueError(f"phase {name!r} index {_short(index)}; allowed: {known.get(name, len(known))}")
        if not _count(step) or (phases and step < phases[-1].step):
            raise ValueError(f"phase {name!r} step {_short(step)}; allowed: an int >= 0, not before the last phase's")
        if not isinstance(rebaselined, list) or not all(isinstance(r, str) for r in rebaselined):
            raise TypeError(f"phase {name!r} rebaselined {_short(rebaselined)}; allowed: a list of str")
        known.setdefault(name, index)
        phases.append(Phase(index=index, name=name, step=step, rebaselined=tuple(rebaselined)))
    if not isinstance(raw_tracks, Mapping):
        raise TypeError(f"tracks: {_short(raw_tracks)}; allowed: a dict of eval key → track")
    tracks: dict[str, TaskEval] = {}
    for key, raw in raw_tracks.items():
        if not isinstance(key, str) or not key.startswith(keys.EVAL_PER_NAME) or not isinstance(raw, Mapping):
            raise TypeError(f"track {_short(key)}: {_short(raw)}; allowed: 'eval/…' → {{task, goal, steps, values}}")
        task, goal, steps, values = raw.get("task"), raw.get("goal"), raw.get("steps"), raw.get("values")
        if not isinstance(task, str) or not task.strip() or goal not in GOALS:
            raise ValueError(f"track {key!r}: task {_short(task)}, goal {_short(goal)}; allowed: a str, max or min")
        if not isinstance(steps, list) or not isinstance(values, list) or len(steps) != len(values):
            raise ValueError(f"track {key!r}: steps and values {_short(raw)}; allowed: two lists of one length")
        if not all(map(_count, steps)) or steps != sorted(steps):
            raise ValueError(f"track {key!r}: steps {_short(steps)}; allowed: ints >= 0 in order")
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            raise ValueError(f"track {key!r}: values {_short(values)}; allowed: numbers")
        tracks[key] = TaskEval(task=task, goal=goal, steps=list(steps), values=[float(v) for v in values])
    announce = state.get("announce")
    if announce is not None and not _count(announce):
        raise ValueError(f"announce {_short(announce)}; allowed: None or an int >= 0")
    return phases, tracks, announce


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _detected(detector: Any, obs: Observation) -> list[Finding]:
    return checked_findings(detector.update(obs))


def _as_signals(name: str, out: object) -> tuple[dict[str, float], str, Tensor | None]:
    """An eval's result as (signals, headline key, per-example scores); TypeError naming what is wrong."""
    key = keys.EVAL_PER_NAME + name
    if isinstance(out, Mapping):
        if not out:
            raise TypeError(f"eval {name!r} returned an empty dict; allowed: metric → number")
        values = {}
        for metric, value in out.items():
            if not isinstance(metric, str) or not metric.strip():
                raise TypeError(f"eval {name!r}: metric name {metric!r}; allowed: a non-empty str")
            values[f"{key}/{metric}"] = _number(f"{name}/{metric}", value)
        return values, next(iter(values)), None
    if isinstance(out, Tensor) and out.ndim == 1 and out.numel() > 0 and _real_tensor(out):
        scores = out.detach().to("cpu", torch.float32)
        return {key: float(scores.mean())}, key, scores
    return {key: _number(name, out)}, key, None


def _number(name: str, value: object) -> float:
    if isinstance(value, Tensor) and value.ndim == 0 and _real_tensor(value):
        return float(value)
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value)  # NaN and Inf are values: recorded as such
    raise TypeError(
        f"eval {name!r} returned {_short(value)} ({type(value).__name__}); allowed: a number, a 0-d tensor, a dict "
        "of metric → number or 0-d tensor, or a 1-d tensor of per-example scores"
    )


def _real_tensor(t: Tensor) -> bool:
    return not (t.is_complex() or t.dtype == torch.bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["GOALS", "EvalListener", "EvalResult", "EvalSpec", "Evaluation", "Goal", "Phase"]
