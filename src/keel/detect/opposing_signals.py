"""Opposing-signals detector: groups of examples moving in opposite directions, in step with a sharpness or loss spike.

Reads ``opposing/opposition`` (the `opposing_signals` probe: how far the top risers of a fixed probe set rose and its
top fallers fell since the last measurement), ``curvature/sharpness`` when the `sharpness` probe runs, and the
loss. Rosenberg & Risteski (2023) describe the sequence: two groups of outliers with opposing signals are balanced in
a narrow valley, sharpness grows, their losses oscillate in antiphase, and the overall loss spikes. An opposition
spike alone is ordinary minibatch noise often enough; this detector warns only when one coincides — within
``within`` steps, either order — with a sharpness spike or a loss spike:

- **opposition spike**: at least ``min_level`` (in the loss's units) and ``z`` robust standard deviations and
  ``min_ratio`` times above the median of the last ``window`` measurements (on the log scale);
- **sharpness spike**: ``sharpness_ratio`` times the largest of its last ``sharpness_history`` measurements (a short
  memory: progressive sharpening, a steady climb, moves that level along and is no spike);
- **loss spike**: ``loss_z`` robust standard deviations and ``loss_ratio`` times above the median of the last
  ``loss_window`` losses (log scale; a loss ≤ 0 is not judged).

One warning per episode of opposition spikes (it ends at a measurement below ``min_ratio / 2`` of the median); a
spike stays on record for a sharpness or loss spike up to ``within`` steps later, and is never warned about twice; a
sharpness or loss spike backs one warning only. The finding names what coincided, and carries the antiphase
correlation and the rose fraction measured with it.

On a real run (an MLP on synthetic images whose "sky" feature points to one class for one group of examples and
against it for another, SGD at a learning rate whose sharpness spikes 3-30× above 2/η) the opposition spread over two
orders of magnitude around its median (a robust sd of ~1 in log units) and was 3-7× its median at most sharpness
spikes: hence ``z`` 1 with ``min_ratio`` 3, the coincidence being what makes a warning specific. There, the probe set's
top risers and fallers were the two opposing groups at nearly every measurement, healthy runs at a lower learning rate
included (antiphase ≈ −0.95): the groups and their antiphase are a property of the data, only the opposition's size
and the sharpness spike mark the episode.

References:
    Rosenberg & Risteski 2023, "Outliers with Opposing Signals Have an Outsized Effect on Neural Network
    Optimization", ICLR 2024, arXiv 2311.04163.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._finding import explained_finding
from keel.detect._running_median import RunningMedian
from keel.detect.detector import DETECTORS
from keel.detect.robust import robust_z

KIND = "opposing_signals"
OPPOSITION, SHARPNESS = keys.OPPOSING_OPPOSITION, keys.CURVATURE_SHARPNESS
MAX_LOG_RATIO = 700.0  # exp() of more overflows


@dataclass(kw_only=True)
class OpposingSignalsDetectorConfig:
    """Settings of the opposing-signals detector.

    Attributes:
        window: Opposition (and sharpness) measurements whose median is the baseline.
        min_history: Measurements needed before a spike counts.
        z: Robust z-score (log units) of an opposition spike.
        min_ratio: Factor above the baseline median an opposition spike must also reach.
        min_level: Least opposition (loss units) that counts.
        scale_floor: Least robust scale assumed, in log units.
        sharpness_ratio: Factor above its recent largest value that makes a sharpness spike.
        sharpness_history: Sharpness measurements whose largest is its baseline.
        loss_window: Losses whose median and MAD are the loss baseline.
        loss_z: Robust z-score (log units) of a loss spike.
        loss_ratio: Factor above its median a loss spike must also reach.
        within: Steps between the opposition spike and the sharpness or loss spike for them to coincide.
    """

    window: int = 20
    min_history: int = 5
    z: float = 1.0  # the opposition's log-scale noise is ~1 on real runs: the coincidence is what makes it specific
    min_ratio: float = 3.0
    min_level: float = 1e-3
    scale_floor: float = 0.1
    sharpness_ratio: float = 2.0
    sharpness_history: int = 3
    loss_window: int = 100
    loss_z: float = 6.0
    loss_ratio: float = 1.5
    within: int = 100

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "window", "min_history", "loss_window", "sharpness_history")
        require_ints(self, "within", minimum=0)
        require_positive(self, "z", "min_level", "scale_floor", "loss_z")
        for name in ("min_ratio", "sharpness_ratio", "loss_ratio"):
            value = getattr(self, name)
            if not (value > 1 and math.isfinite(value)):
                raise ValueError(f"OpposingSignalsDetectorConfig.{name}={value!r}; allowed: a finite number > 1")
        if self.min_history > min(self.window, self.loss_window):
            raise ValueError(
                f"OpposingSignalsDetectorConfig.min_history={self.min_history}, window={self.window}, loss_window="
                f"{self.loss_window}; allowed: min_history <= window and <= loss_window"
            )


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


@DETECTORS.register("opposing_signals")
class OpposingSignalsDetector:
    """Flags an opposition spike of the probe set's groups that coincides with a sharpness or loss spike.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = OpposingSignalsDetector()
        >>> obs = [Observation(step=s, values={keys.LOSS: 2.0 + 0.01 * (s % 3)}) for s in range(40)]
        >>> obs += [Observation(step=s, values={keys.LOSS: 2.0, keys.OPPOSING_OPPOSITION: 0.02 + 0.001 * (s % 4)})
        ...         for s in range(0, 40, 5)]
        >>> obs += [Observation(step=40, values={keys.LOSS: 2.0, keys.OPPOSING_OPPOSITION: 0.4}),
        ...         Observation(step=41, values={keys.LOSS: 6.0})]
        >>> [(f.step, f.severity, f.evidence["coincides_with"]) for o in sorted(obs, key=lambda o: o.step)
        ...  for f in det.update(o)]
        [(41, 'warning', 'loss')]
    """

    name = "opposing_signals"
    reads = (OPPOSITION, SHARPNESS, keys.LOSS)  # `keel.detect.scan.ReadsKeys`
    rests_when_finite = False

    def __init__(self, config: OpposingSignalsDetectorConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, OpposingSignalsDetectorConfig, config, fields)
        cfg = self.config
        self._opposition = RunningMedian(size=cfg.window, capacity=cfg.window)
        self._sharpness = RunningMedian(size=cfg.sharpness_history, capacity=cfg.sharpness_history)
        self._loss = RunningMedian(size=cfg.loss_window, capacity=cfg.loss_window)
        self._spike: dict[str, Any] | None = None  # the latest opposition spike
        self._partner: dict[str, Any] | None = None  # the latest sharpness or loss spike
        self._reported = False  # this episode's warning was given (the episode ends at a calm measurement)
        self._reported_step = -1  # the opposition spike last warned about: never twice

    def update(self, obs: Observation) -> list[Finding]:
        values = obs.values
        for key, judge in ((keys.LOSS, self._judge_loss), (SHARPNESS, self._judge_sharpness)):
            x = values.get(key)
            if x is not None and math.isfinite(x) and x > 0 and judge(x):
                self._partner = {"key": key, "step": obs.step, "value": x}
        x = values.get(OPPOSITION)
        if x is not None and math.isfinite(x) and x >= 0:
            self._judge_opposition(obs, x)
        spike, partner = self._spike, self._partner
        if (
            self._reported
            or spike is None
            or partner is None
            or spike["step"] <= self._reported_step
            or abs(partner["step"] - spike["step"]) > self.config.within
        ):
            return []
        self._reported, self._reported_step = True, spike["step"]
        self._partner = None  # one sharpness or loss spike backs one warning, not every opposition episode near it
        return [self._finding(obs.step, spike, partner)]

    def _judge_opposition(self, obs: Observation, x: float) -> None:
        cfg = self.config
        y = _log(x)
        history = self._opposition
        if len(history) >= cfg.min_history:
            median, scale = history.location_scale()
            log_ratio = min(y - median, MAX_LOG_RATIO) if math.isfinite(median) else MAX_LOG_RATIO
            z = robust_z(y, median, scale, cfg.scale_floor) if math.isfinite(y) and math.isfinite(median) else 0.0
            if x >= cfg.min_level and z >= cfg.z and log_ratio >= math.log(cfg.min_ratio):
                self._spike = {
                    "step": obs.step,
                    "value": x,
                    "ratio": math.exp(log_ratio),
                    "z": z,
                    "baseline": math.exp(median) if math.isfinite(median) else 0.0,
                    "antiphase": _finite_or_none(obs.values.get(keys.OPPOSING_ANTIPHASE)),
                    "rose": _finite_or_none(obs.values.get(keys.OPPOSING_ROSE)),
                }
            elif log_ratio < math.log(cfg.min_ratio / 2):  # back near its baseline: the episode ends
                self._reported = False
        # every measurement joins the baseline (floored: a probe set that all moves one way has opposition 0)
        history.push(max(y, _log(cfg.min_level) - 1.0))

    def _judge_sharpness(self, x: float) -> bool:
        cfg, y = self.config, math.log(x)
        spike = len(self._sharpness) >= cfg.sharpness_history and y - max(self._sharpness.values) >= math.log(
            cfg.sharpness_ratio
        )
        self._sharpness.push(y)
        return spike

    def _judge_loss(self, x: float) -> bool:
        cfg, y = self.config, math.log(x)
        spike = False
        if len(self._loss) >= cfg.min_history:
            median, scale = self._loss.location_scale()
            spike = robust_z(y, median, scale, 1e-3) >= cfg.loss_z and y - median >= math.log(cfg.loss_ratio)
        self._loss.push(y)
        return spike

    def _finding(self, step: int, spike: dict[str, Any], partner: dict[str, Any]) -> Finding:
        what = "sharpness" if partner["key"] == SHARPNESS else "loss"
        evidence: dict[str, Any] = {
            "opposition": round(spike["value"], 6),
            "opposition_step": spike["step"],
            "baseline_median": round(spike["baseline"], 8),
            "ratio": round(spike["ratio"], 3),
            "z": round(spike["z"], 2),
            "antiphase": spike["antiphase"],
            "rose": spike["rose"],
            "coincides_with": what,
            "coincident_step": partner["step"],
            "coincident_value": round(partner["value"], 6),
        }
        text = (
            f"two groups of the probe set moved in opposite directions ({spike['ratio']:.3g}× the usual opposition "
            f"at step {spike['step']}) in step with a {what} spike at step {partner['step']}."
        )
        return explained_finding(
            step=step,
            kind=KIND,
            severity="warning",
            signal=OPPOSITION,
            value=spike["value"],
            baseline=spike["baseline"],
            evidence=evidence,
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "opposition": list(self._opposition.values),
            "sharpness": list(self._sharpness.values),
            "loss": list(self._loss.values),
            "spike": self._spike,
            "partner": self._partner,
            "reported": self._reported,
            "reported_step": self._reported_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = cfg = OpposingSignalsDetectorConfig(**state["config"])
        self._opposition = RunningMedian(size=cfg.window, capacity=cfg.window, values=state["opposition"])
        size = cfg.sharpness_history
        self._sharpness = RunningMedian(size=size, capacity=size, values=state["sharpness"])
        self._loss = RunningMedian(size=cfg.loss_window, capacity=cfg.loss_window, values=state["loss"])
        self._spike = dict(state["spike"]) if state["spike"] is not None else None
        self._partner = dict(state["partner"]) if state["partner"] is not None else None
        self._reported = bool(state["reported"])
        self._reported_step = int(state["reported_step"])


def _finite_or_none(x: float | None) -> float | None:
    return round(x, 6) if x is not None and math.isfinite(x) else None
