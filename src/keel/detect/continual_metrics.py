"""Continual-learning metrics over evals tied to tasks: min-ACC, WC-ACC, windowed forgetting, forgetting, BWT.

Pure functions of the eval history (no torch): ``tracks`` maps each eval key to the task it measures and its values
by step, ``phases`` lists the phase switches as ``(first step, task name)``. A task is *seen* from the first step of
its first phase on; it is *current* while its phase trains; it is *finished* when it was seen and is not current.
Values measured before a task is seen do not count (Avalanche's rule: experiences not trained yet are excluded).
NaN values are skipped. ``goal="min"`` evals (a loss) are turned into qualities (``−value``) so that every metric
reads "higher is better" inside; the levels (min-ACC, WC-ACC) are given back in the evals' own units, and only
when all tracks share one goal.

Definitions (each as its source's code computes it):

- **min-ACC** (De Lange et al. 2023, ``TaskTrackingMINAccuracyPluginMetric``): per finished task, the worst value
  seen at an eval while it was finished; averaged over the finished tasks.
- **WC-ACC** (``WCACCPluginMetric``): the mean of [the current task's latest value] and the finished tasks' minima,
  which is (1/k)·A(current) + (1 − 1/k)·min-ACC with k tasks seen.
- **WF^w / WP^w** (``WindowedForgettingPluginMetric`` / ``WindowedPlasticityPluginMetric``): per task, the largest
  drop A_i − A_j (rise A_j − A_i), i < j, within any w consecutive evals of it since it was seen (0 when none),
  averaged over tasks — the code's ``TaskAveragingPluginMetric``, not a maximum over tasks.
- **forgetting** (Avalanche 0.6 ``StreamForgetting``): per finished task, its value at the last eval of its most
  recent phase (the "initial" one) minus its latest value; averaged. **BWT** (``StreamBWT``) = latest − initial =
  −forgetting. Unlike WF, forgetting compares two points only, so a gap that recovered shows as 0 here.
- **performance maintenance** (lifelong suite, New et al. 2022, l2metrics ``PerformanceMaintenance``, method
  ``mrlep``): per finished task, the mean over its evals after its most recent phase of (value − the value at the
  end of that phase); averaged. Negative: the task is not maintained. The rest of that suite (relative performance,
  sample efficiency) needs single-task experts keel does not have; its recovery time is the stability-gap
  detector's ``recovery_steps``.

References:
    De Lange, van de Ven, Tuytelaars 2023, "Continual evaluation for lifelong learning: identifying the stability
    gap", ICLR, arXiv 2205.13452; code github.com/Mattdl/ContinualEvaluation (src/eval/continual_eval_metrics.py).
    Lomonaco et al. 2021, Avalanche (avalanche/evaluation/metrics/forgetting_bwt.py).
    New et al. 2022, "Lifelong Learning Metrics", arXiv 2201.08278; code github.com/lifelong-learning-systems/l2metrics.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from keel._core import keys

WINDOWS = (10, 100)  # the paper's w


@dataclass(kw_only=True)
class TaskEval:
    """One eval key's history: the task it measures, its goal and its values by step (steps non-decreasing).

    Example:
        >>> t = TaskEval(task="a")
        >>> t.add(9, 0.8)
        >>> t.steps, t.values
        ([9], [0.8])
    """

    task: str
    goal: Literal["max", "min"] = "max"
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        if self.steps and step < self.steps[-1]:
            raise ValueError(f"TaskEval.add(step={step}) after step {self.steps[-1]}; allowed: steps in order")
        self.steps.append(int(step))
        self.values.append(float(value))


def phase_at(phases: Sequence[tuple[int, str]], step: int) -> str | None:
    """The task trained at ``step`` (``phases`` sorted by first step), or None before the first phase.

    Example:
        >>> phase_at([(0, "a"), (100, "b")], 99), phase_at([(0, "a"), (100, "b")], 100)
        ('a', 'b')
    """
    i = bisect.bisect_right([s for s, _ in phases], step) - 1
    return phases[i][1] if i >= 0 else None


def trained_before(phases: Sequence[tuple[int, str | None]], task: str, step: int) -> bool:
    """Whether ``task`` was trained before the phase running at ``step``: it names an earlier phase, or an earlier
    phase is unnamed (``None``: the steps before the first declared phase) and no phase names ``task``, so those
    steps may have trained it. ``phases`` are ``(first step, name)`` in order.

    Example:
        >>> phases = [(0, "a"), (30, "b")]
        >>> trained_before(phases, "a", 35), trained_before(phases, "b", 35), trained_before(phases, "c", 35)
        (True, False, False)
        >>> trained_before([(0, None), (30, "b")], "c", 35)  # the unnamed first steps may have trained c
        True
    """
    current = bisect.bisect_right([s for s, _ in phases], step) - 1
    earlier = {name for _, name in phases[: max(current, 0)]}
    return task in earlier or (None in earlier and all(name != task for _, name in phases))


def largest_drop(values: Sequence[float], window: int) -> float:
    """max over i < j with j − i < ``window`` of values[i] − values[j]; 0 when there is no such pair or no drop.

    Example:
        >>> round(largest_drop([0.9, 0.5, 0.8, 0.2], 2), 6), round(largest_drop([0.9, 0.5, 0.8, 0.2], 4), 6)
        (0.6, 0.7)
    """
    a = np.asarray(values, dtype=np.float64)
    if window < 2 or a.size < 2:
        return 0.0
    w = min(window, a.size)
    # best[j] = max of the (w − 1) values before j: a padded sliding maximum, O(n·w) in C
    padded = np.concatenate([np.full(w - 1, -np.inf), a[:-1]])
    best = np.lib.stride_tricks.sliding_window_view(padded, w - 1).max(axis=1)
    return max(0.0, float(np.max(best - a)))


def continual_metrics(
    tracks: Mapping[str, TaskEval], phases: Sequence[tuple[int, str]], windows: Sequence[int] = WINDOWS
) -> dict[str, float]:
    """The ``continual/…`` signals (keys in `keel._core.keys`) over ``tracks``, as of their latest values.

    A metric that has nothing to average over (no finished task, no eval of the current task) is left out.

    Example (the worked example in tests/detect/test_continual_metrics.py):
        >>> tracks = {"eval/a": TaskEval(task="a", steps=[9, 19, 29, 39], values=[0.5, 0.9, 0.4, 0.7]),
        ...           "eval/b": TaskEval(task="b", steps=[19, 29, 39], values=[0.1, 0.3, 0.6])}
        >>> m = continual_metrics(tracks, [(0, "a"), (20, "b")], windows=(2,))
        >>> names = ("min_acc", "wc_acc", "forgetting", "wf/2")
        >>> [round(m[f"continual/{k}"], 6) for k in names]
        [0.4, 0.5, 0.2, 0.25]
    """
    phases = sorted(phases)
    if not tracks or not phases:
        return {}
    latest = max((t.steps[-1] for t in tracks.values() if t.steps), default=None)
    if latest is None:
        return {}
    current = phase_at(phases, latest)
    worst: list[float] = []  # per finished track, in quality units
    drops: dict[int, list[float]] = {w: [] for w in windows}
    rises: dict[int, list[float]] = {w: [] for w in windows}
    forgetting: list[float] = []
    maintenance: list[float] = []
    now: list[float] = []  # the current task's latest quality, per track
    for track in tracks.values():
        sign = 1.0 if track.goal == "max" else -1.0
        seen = [(s, sign * v) for s, v in zip(track.steps, track.values, strict=True) if _seen(phases, track.task, s)]
        seen = [(s, q) for s, q in seen if math.isfinite(q)]
        if not seen:
            continue
        qualities = [q for _, q in seen]
        for w in windows:
            drops[w].append(largest_drop(qualities, w))
            rises[w].append(largest_drop([-q for q in qualities], w))
        if track.task == current:
            now.append(qualities[-1])
            continue
        finished = [q for s, q in seen if phase_at(phases, s) != track.task]
        if finished:
            worst.append(min(finished))
        end = _last_phase_end(phases, track.task)
        during = [q for s, q in seen if s < end and phase_at(phases, s) == track.task]
        after = [q for s, q in seen if s >= end]
        if during and after:
            forgetting.append(during[-1] - after[-1])
            maintenance.append(sum(q - during[-1] for q in after) / len(after))
    out: dict[str, float] = {}
    same_goal = len({t.goal for t in tracks.values()}) == 1
    unit = 1.0 if next(iter(tracks.values())).goal == "max" else -1.0
    if worst and same_goal:
        out[keys.CONTINUAL_MIN_ACC] = unit * _mean(worst)
    if now and same_goal:
        out[keys.CONTINUAL_WC_ACC] = unit * _mean(now + worst) if worst else unit * _mean(now)
    for w in windows:
        if drops[w]:
            out[f"{keys.CONTINUAL_WF_PER_WINDOW}{w}"] = _mean(drops[w])
            out[f"{keys.CONTINUAL_WP_PER_WINDOW}{w}"] = _mean(rises[w])
    if forgetting:
        out[keys.CONTINUAL_FORGETTING] = _mean(forgetting)
        out[keys.CONTINUAL_BWT] = -out[keys.CONTINUAL_FORGETTING]
        out[keys.CONTINUAL_PERFORMANCE_MAINTENANCE] = _mean(maintenance)
    return out


def _seen(phases: Sequence[tuple[int, str]], task: str, step: int) -> bool:
    return any(name == task and start <= step for start, name in phases)


def _last_phase_end(phases: Sequence[tuple[int, str]], task: str) -> int:
    """The first step after ``task``'s most recent phase (a large number while that phase still runs)."""
    for i in range(len(phases) - 1, -1, -1):
        if phases[i][1] == task:
            return phases[i + 1][0] if i + 1 < len(phases) else 1 << 62
    return 1 << 62


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


__all__ = ["WINDOWS", "TaskEval", "continual_metrics", "largest_drop", "phase_at", "trained_before"]
