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

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel.detect.continual_metrics import TaskEval, continual_metrics
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
        self._announce = index
        self._write_meta()
        return index

    def _rebaseline(self) -> tuple[str, ...]:
        """Start new baselines for the one-signal detectors of the loss and gradient norm: the new phase's data has
        its own loss level, and a jump to it is not a spike or a divergence (under ``policy="recover"`` a class-
        incremental switch otherwise rolled back three times and aborted). Each such detector is reset to the state
        of a fresh one with its config; the names are kept in the phase's meta entry."""
        done = []
        for detector in self.components.detectors:
            config = getattr(detector, "config", None)
            signal = getattr(config, "signal", None)
            if signal not in (keys.LOSS, keys.GRAD_NORM):
                continue  # only the one-signal baselines (spikes, divergence); e.g. the non-finite check needs none
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
        found = self._detect(step, values, results)
        self.components.call("recorder", self.recorder.evaluation, Observation(step=step, values=values), found)
        return values

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
                        self.components.call(label, note, key, result.spec.goal if key == result.headline else None)
            found.extend(self.components.call(label, _detected, detector, obs) or [])
        return found

    def _write_meta(self) -> None:
        meta = {"evals": {n: s.describe() for n, s in self.specs.items()}, "phases": [p.to_dict() for p in self.phases]}
        self.components.call("recorder", self.recorder.meta, meta)


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
