"""Stability-gap detector: an earlier task's eval collapsing right after a phase switch, its depth and recovery.

De Lange et al. evaluate continually and find that, right after a switch to a new task, the accuracy on earlier
tasks drops sharply and then (mostly) recovers — a transient collapse that evaluating only at the end of each task
never shows. keel sees it through the evals `Guard.evaluate` / `Guard.record_eval` record (``eval/…``) and the
switches `Guard.phase` marks (``phase/index``).

The rule, per eval key: at a switch, the key's last values in the phase that ended give its level (the median of
the last ``baseline_points``) and its noise (`keel.detect.robust.step_noise` of the last ``window`` differences,
so a trend does not count as noise; at least ``relative_floor`` of the level). Within ``within_evals`` evals after
the switch, ``confirm`` evals in a row below that level by ``z`` noise units and by ``relative_floor`` of the level
are a gap: a ``warning`` at the last of them (one low eval is not enough: an eval on a few dozen examples near 100 %
dips by ~0.1 now and then — with one eval, 1 phase switch in 10 that changed nothing warned). One low eval that the
next eval has already left is a gap on its own when it is deep — ``single_eval_share`` (25 %) of the level and
2·``z`` noise units — warned at that next eval: with Avalanche-style evals every 10 iterations, a replay run's gap
of 0.47 (1.0 → 0.53 → 0.98 on 300 examples) lasted one eval.
Its evidence: the eval key, ``value_before`` (the level), ``minimum`` so far, ``depth``
(level − minimum, in the eval's units: positive is worse), ``relative_depth``, ``steps_after_switch``, the switch
step and phases. The gap counts as recovered once the eval has regained ``recovered_share`` of its depth (half, by
default; or is back within 2 noise units of its level): an ``info`` finding of the same kind then reports the final
``minimum`` and ``depth``, ``recovery_steps`` (from the switch; l2metrics' recovery time, counted in steps, to half
the depth by default as a gap often recovers only part of the way) and ``recovered_to`` / ``lasting_drop`` (what the
task kept losing) — so the warning comes early and the recovery is a later record, both in the store. A gap that has
not recovered by the next switch gets no recovery record.

Only tasks trained before the switch are judged: the Guard tells the detector each eval's task (``task=``) and the
phases so far (`note_phases`), and a key whose task was not trained in an earlier phase — the task the switch starts,
or one still to come, whose eval may sit above chance and fall (domain-incremental) — is not armed
(`keel.detect.continual_metrics.trained_before`, the continual metrics' notion of a seen task). A key with no task
(a log read by `keel doctor`, an eval not tied to a task) is judged at every switch.

Goals: an eval the Guard records says whether higher or lower is better (`note_eval`); in a log read by
`keel doctor` a key whose last part names a loss or a perplexity (``loss``, ``ppl``, ``perplexity``) is taken as
lower-is-better. Silent without a switch (a plain fine-tune), without evals, and for a key with fewer than
``baseline_points + 1`` values before the switch (its noise is unknown). Before a phase index is seen it only
looks up one key per observation.

References:
    De Lange, van de Ven, Tuytelaars 2023, "Continual evaluation for lifelong learning: identifying the stability
    gap", ICLR, arXiv 2205.13452; code github.com/Mattdl/ContinualEvaluation.
    New et al. 2022, "Lifelong Learning Metrics", arXiv 2201.08278 (recovery time); l2metrics recovery_time.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._finding import explained_finding
from keel.detect.continual_metrics import trained_before
from keel.detect.detector import DETECTORS
from keel.detect.robust import median, step_noise

KIND = "stability_gap"
_LOWER_IS_BETTER = ("loss", "ppl", "perplexity")


@dataclass(kw_only=True)
class StabilityGapConfig:
    """Settings of the stability-gap detector.

    Attributes:
        baseline_points: Last values before a switch whose median is the eval's level.
        window: Last values before a switch whose differences give its noise.
        z: Noise units below the level that make a gap.
        relative_floor: Least drop that counts, and least noise assumed, as a share of the level's size.
        within_evals: Evals after a switch in which a gap may begin (later falls are forgetting, not the gap).
        recovered_share: Share of the depth the eval must regain to count as recovered (1: all of it, up to 2 noise
            units).
        confirm: Evals in a row below the level by ``z`` noise units that make a gap (the gap's onset is the first).
        single_eval_share: A single low eval, recovered by the next, is a gap on its own when it is below the level
            by this share of the level's size and by 2·``z`` noise units (warned at that next eval).
    """

    baseline_points: int = 3
    window: int = 10
    z: float = 4.0
    relative_floor: float = 0.02
    within_evals: int = 20
    recovered_share: float = 0.5
    confirm: int = 2
    single_eval_share: float = 0.25

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "baseline_points", "within_evals", "confirm")
        require_ints(self, "window", minimum=2)
        require_positive(self, "z", "relative_floor", "recovered_share", "single_eval_share")
        if self.recovered_share > 1:
            raise ValueError(f"StabilityGapConfig.recovered_share={self.recovered_share!r}; allowed: in (0, 1]")


@DETECTORS.register(KIND)
class StabilityGapDetector:
    """Flags the transient collapse of an earlier task's eval right after a phase switch.

    Example:
        >>> from keel._core import Observation, keys
        >>> det, found = StabilityGapDetector(), []
        >>> evals = [0.80, 0.82, 0.81, 0.83, 0.82] + [0.40, 0.55, 0.70, 0.81]  # switch to phase 1 at step 50
        >>> for i, acc in enumerate(evals):
        ...     values = {"eval/a": acc, keys.PHASE_INDEX: float(i >= 5)}
        ...     found += det.update(Observation(step=10 * i + 9, values=values))
        >>> [(f.severity, f.step, f.evidence["depth"]) for f in found]
        [('warning', 69, 0.42), ('info', 79, 0.42)]
    """

    name = KIND
    reads = (keys.EVAL_PER_NAME, keys.PHASE_INDEX)  # `keel.detect.scan.ReadsKeys`
    rests_when_finite = False

    def __init__(self, config: StabilityGapConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, StabilityGapConfig, config, fields)
        self.goals: dict[str, str | None] = {}  # eval key → "max" / "min", or None: not watched
        self._phase: float | None = None
        self._switch: dict[str, Any] = {}  # the last switch: step, from, to
        self._history: dict[str, list[float]] = {}  # per key, its qualities in the current phase (last `window`+1)
        self._gaps: dict[str, dict[str, Any]] = {}  # per key armed at the last switch: baseline and gap so far
        self.tasks: dict[str, str] = {}  # eval key → the task (phase name) it measures, when tied to one
        self.phases: list[tuple[int, str | None]] = []  # (first step, name; None: unnamed), as the Guard declared

    def note_eval(self, key: str, goal: Literal["max", "min"] | None, task: str | None = None) -> None:
        """Tell the detector an eval key's goal (``None``: do not watch it, e.g. a dict eval's other metrics) and
        the task it measures (``None``: none; the key is judged at every switch)."""
        self.goals[key] = goal
        if task is not None:
            self.tasks[key] = task

    def note_phases(self, phases: list[tuple[int, str | None]]) -> None:
        """Tell the detector the phases so far, ``(first step, name)`` in order (``None``: the unnamed steps
        before the first declared phase), so that it judges only the evals of tasks trained before a switch."""
        self.phases = [(int(step), name) for step, name in phases]

    def update(self, obs: Observation) -> list[Finding]:
        phase = obs.values.get(keys.PHASE_INDEX)
        if phase is None and self._phase is None:
            return []  # no phase seen: a plain run, nothing to compare
        found: list[Finding] = []
        if phase is not None and math.isfinite(phase) and phase != self._phase:
            if self._phase is not None:
                self._arm(obs.step, self._phase, phase)
            self._phase = phase
        for key, value in obs.values.items():
            if not key.startswith(keys.EVAL_PER_NAME) or not math.isfinite(value):
                continue
            goal = self.goals.get(key, _guess_goal(key))
            if goal is None:
                continue
            quality = value if goal == "max" else -value
            finding = self._judge(obs.step, key, quality, goal)
            if finding is not None:
                found.append(finding)
            history = self._history.setdefault(key, [])
            history.append(quality)
            del history[: -(self.config.window + 1)]
        return found

    def _arm(self, step: int, before: float, after: float) -> None:
        """A switch at ``step``: every key with enough values in the phase that ended gets its level and noise."""
        cfg = self.config
        self._switch = {"step": step, "from": int(before), "to": int(after)}
        self._gaps = {}
        for key, history in self._history.items():
            if len(history) < cfg.baseline_points + 1 or not self._trained(key, step):
                continue
            level = median(history[-cfg.baseline_points :])
            diffs = [b - a for a, b in zip(history[:-1], history[1:], strict=True)]
            noise = max(step_noise(diffs), cfg.relative_floor * abs(level), 1e-12)
            self._gaps[key] = {
                "level": level,
                "noise": noise,
                "evals": 0,
                "minimum": math.inf,
                "open": False,
                "deep_run": 0,  # evals in a row below the level by z noise units
            }
        self._history = {}

    def _trained(self, key: str, step: int) -> bool:
        """Whether ``key``'s task was trained before the phase running at ``step`` (True for a key with no task,
        or when no phases were noted)."""
        task = self.tasks.get(key)
        return task is None or not self.phases or trained_before(self.phases, task, step)

    def _judge(self, step: int, key: str, quality: float, goal: str) -> Finding | None:
        gap = self._gaps.get(key)
        if gap is None:
            return None
        cfg = self.config
        gap["evals"] += 1
        level, noise = gap["level"], gap["noise"]
        if not gap["open"]:
            deep = level - quality >= max(cfg.z * noise, cfg.relative_floor * abs(level))
            if gap["evals"] > cfg.within_evals:
                del self._gaps[key]  # the window for a gap passed: a later fall is forgetting
                return None
            if not deep:
                if gap["deep_run"] == 1 and self._deep_on_its_own(gap):  # one eval saw the whole gap
                    gap.update(open=True, deep_run=0)
                    return self._finding(step, key, gap, goal, "warning")
                gap.update(deep_run=0, minimum=math.inf)
                return None
            if gap["deep_run"] == 0:
                gap.update(onset=step)
            if quality < gap["minimum"]:
                gap.update(minimum=quality, minimum_step=step)
            gap["deep_run"] += 1
            if gap["deep_run"] < cfg.confirm:
                return None
            gap.update(open=True)
            return self._finding(step, key, gap, goal, "warning")
        if quality < gap["minimum"]:
            gap.update(minimum=quality, minimum_step=step)
        if quality >= level - max(2 * noise, (1 - cfg.recovered_share) * (level - gap["minimum"])):
            del self._gaps[key]
            gap["recovered_to"] = quality
            return self._finding(step, key, gap, goal, "info")
        return None

    def _deep_on_its_own(self, gap: dict[str, Any]) -> bool:
        """Whether the one low eval of ``gap`` is deep enough to be a gap without a second: by
        ``single_eval_share`` of the level and 2·``z`` noise units. Evals every ρ iterations (Avalanche's
        ``eval_every``) can see a gap that lasts less than 2ρ only once; a dip of 7 in 64 examples near 100 %
        (0.11), which SGD noise alone gives now and then, is not deep enough."""
        cfg = self.config
        depth = gap["level"] - gap["minimum"]
        return depth >= max(2 * cfg.z * gap["noise"], cfg.single_eval_share * abs(gap["level"]))

    def _finding(self, step: int, key: str, gap: dict[str, Any], goal: str, severity: Any) -> Finding:
        sign = 1.0 if goal == "max" else -1.0  # back to the eval's own units
        level, minimum = gap["level"], gap["minimum"]
        depth = level - minimum
        after = step - self._switch["step"]
        evidence: dict[str, Any] = {
            "eval": key,
            "goal": goal,
            "value_before": round(sign * level, 6),
            "minimum": round(sign * minimum, 6),
            "minimum_step": gap["minimum_step"],
            "depth": round(depth, 6),
            "relative_depth": round(depth / abs(level), 4) if level else None,
            "noise": round(gap["noise"], 6),
            "depth_z": round(depth / gap["noise"], 2),
            "switch_step": self._switch["step"],
            "phase_from": self._switch["from"],
            "phase_to": self._switch["to"],
            "steps_after_switch": gap["onset"] - self._switch["step"],
        }
        if severity == "info":
            evidence["recovery_steps"] = after
            evidence["recovered_to"] = round(sign * gap["recovered_to"], 6)
            evidence["lasting_drop"] = round(level - gap["recovered_to"], 6)
            text = (
                f"{key} recovered {after} steps after the switch to phase {self._switch['to']} (from "
                f"{evidence['minimum']:.4g}, a gap {evidence['depth']:.4g} deep, back near "
                f"{evidence['value_before']:.4g})."
            )
        else:
            text = (
                f"{key} fell from {evidence['value_before']:.4g} to {evidence['minimum']:.4g} "
                f"{evidence['steps_after_switch']} steps after the switch to phase {self._switch['to']} at step "
                f"{self._switch['step']} ({evidence['depth_z']:.1f} times its noise before the switch)."
            )
        return explained_finding(
            step=step,
            kind=KIND,
            severity=severity,
            signal=key,
            value=sign * (minimum if severity == "warning" else gap["level"]),
            baseline=sign * level,
            evidence=evidence,
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "goals": dict(self.goals),
            "phase": self._phase,
            "switch": dict(self._switch),
            "history": {k: list(v) for k, v in self._history.items()},
            "gaps": {k: dict(v) for k, v in self._gaps.items()},
            "tasks": dict(self.tasks),
            "phases": [list(p) for p in self.phases],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = StabilityGapConfig(**state["config"])
        self.goals = dict(state["goals"])
        self._phase = state["phase"]
        self._switch = dict(state["switch"])
        self._history = {k: list(v) for k, v in state["history"].items()}
        self._gaps = {k: dict(v) for k, v in state["gaps"].items()}
        self.tasks = dict(state.get("tasks", {}))  # snapshots written before tasks were noted: none
        self.phases = [(int(step), name) for step, name in state.get("phases", [])]


def _guess_goal(key: str) -> Literal["max", "min"]:
    last = key.rsplit("/", 1)[-1].lower()
    return "min" if any(word in last for word in _LOWER_IS_BETTER) else "max"
