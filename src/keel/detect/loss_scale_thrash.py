"""Loss-scale thrash: a GradScaler that backs off again and again instead of settling.

Reads ``amp/overflow`` (1 on a step whose scaled gradients overflowed: the scaler skipped it and halved its scale)
and ``amp/scale`` (the scale that step used); the Guard records both from the scaler's device state whenever it is
given a ``torch.amp.GradScaler``. Silent without them.

A healthy dynamic loss scale is a sawtooth: it doubles after ``growth_interval`` clean steps and halves on the
overflow that probing up causes, about one overflow per growth interval (NVIDIA/apex#864), so it stays within a
halving or two of its level. The first steps are the scaler's search down from its initial scale (2¹⁶), several
overflows in a row that are benign too; they end at the first clean step, and only then does this detector judge.
Thrash is what that pattern is not (domain-anchors §2.3):

- consecutive backoffs: ``max_consecutive`` overflows in a row (the scale cut 8× in three steps): the gradients
  overflow at every scale tried — a NaN or Inf born in the forward pass does that at any scale, and the scaler
  then halves down to 0 (NVIDIA/apex#834);
- the scale falling: ``max_halvings`` halvings below its highest value of the last ``window`` steps. Each
  overflow halves it and each growth interval doubles it back, so a net fall is exactly overflows far more
  frequent than growths (far more than one per growth interval), whatever the interval is;
- critical: the scale at or below ``min_scale`` (DeepSpeed's ``min_loss_scale`` 1 and its "loss scale already at
  minimum" exit) — even during the initial search, 16 halvings down from 2¹⁶ —, or ``critical_consecutive``
  overflows in a row after it. At such a scale fp16 gradients underflow, or the run makes no update at all.

References:
    Micikevicius et al. 2018, "Mixed Precision Training", arXiv 1710.03740. ``torch.amp.GradScaler`` (init 2¹⁶,
    growth 2, backoff 0.5, growth_interval 2000). NVIDIA/apex#834, #864; deepspeedai/DeepSpeed#931 (hysteresis).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS

KIND = "loss_scale_thrash"
SMALLEST = 1e-45  # log2 of a scale of 0 (the apex#834 end state) taken at the smallest float32 instead of -inf


@dataclass(kw_only=True)
class LossScaleThrashConfig:
    """Settings of the loss-scale thrash detector.

    Attributes:
        max_consecutive: Overflows in a row (after the scaler's initial search) that make a warning.
        max_halvings: Halvings of the scale below its highest value of the last ``window`` steps that make a warning.
        window: Steps over which the scale's highest value is kept.
        min_scale: A scale at or below this is critical.
        critical_consecutive: Overflows in a row that are critical.
    """

    max_consecutive: int = 3
    max_halvings: float = 4.0
    window: int = 500
    min_scale: float = 1.0
    critical_consecutive: int = 10

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "max_consecutive", "window", "critical_consecutive")
        require_positive(self, "max_halvings", "min_scale")
        if self.critical_consecutive < self.max_consecutive:
            raise ValueError(
                f"LossScaleThrashConfig.critical_consecutive={self.critical_consecutive!r}; "
                f"allowed: an int >= max_consecutive ({self.max_consecutive})"
            )


def halvings(peak: float, scale: float) -> float:
    """How many halvings ``scale`` lies below ``peak`` (0 when it is not below).

    Example:
        >>> halvings(65536.0, 4096.0), halvings(8.0, 16.0), halvings(1024.0, 0.0) > 140
        (4.0, 0.0, True)
    """
    return max(0.0, math.log2(max(peak, SMALLEST)) - math.log2(max(scale, SMALLEST)))


@DETECTORS.register("loss_scale_thrash")
class LossScaleThrashDetector:
    """Flags a dynamic loss scale that keeps backing off: overflows in a row, or a scale falling away.

    In `default_detectors`: with no GradScaler nothing is read and it costs one dictionary look-up per step.

    Example:
        >>> from keel._core import Observation, keys
        >>> det, found, scale = LossScaleThrashDetector(), [], 2.0**16
        >>> for s in range(60):  # 3 overflows of the initial search, then clean, then overflowing from step 40 on
        ...     over = s < 3 or s >= 40
        ...     found += det.update(Observation(step=s, values={keys.AMP_OVERFLOW: float(over), keys.AMP_SCALE: scale}))
        ...     scale = scale / 2 if over else scale
        >>> [(f.step, f.severity, f.evidence["consecutive"]) for f in found]
        [(42, 'warning', 3), (49, 'critical', 10)]
    """

    name = "loss_scale_thrash"
    reads = (keys.AMP_OVERFLOW, keys.AMP_SCALE)
    rests_when_finite = False

    def __init__(self, config: LossScaleThrashConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, LossScaleThrashConfig, config, fields)
        self._settled = False
        self._consecutive = 0
        # since settling, within the last `window` steps: (step, scale) of each value no later value reaches — a
        # falling staircase whose first entry is the window's highest scale — and the steps that overflowed
        self._peaks: deque[tuple[int, float]] = deque()
        self._overflows: deque[int] = deque()
        self._episode = Episode()

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        overflow, scale = obs.values.get(keys.AMP_OVERFLOW), obs.values.get(keys.AMP_SCALE)
        if overflow is None or scale is None or not (math.isfinite(overflow) and math.isfinite(scale)):
            return []
        overflowed = overflow > 0
        self._consecutive = self._consecutive + 1 if overflowed else 0
        if not overflowed:
            self._settled = True  # the initial search is over at its first clean step
        if self._settled:
            self._remember(obs.step, scale, overflowed)
        peak_step, peak = self._peaks[0] if self._peaks else (obs.step, scale)
        fallen = halvings(peak, scale)
        critical = scale <= cfg.min_scale or (self._settled and self._consecutive >= cfg.critical_consecutive)
        warning = self._settled and (self._consecutive >= cfg.max_consecutive or fallen >= cfg.max_halvings)
        if not (critical or warning):
            if fallen <= 1 and not overflowed:  # back on the sawtooth: a later fall is a new episode
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        # the episode began where the scale started falling: the run of overflows, or the window's high
        self._episode.qualify(onset=obs.step - self._consecutive + 1 if self._consecutive else peak_step)
        severity = self._episode.escalate(critical=critical, warning=warning)
        if severity is None:
            return []
        evidence: dict[str, Any] = {
            "scale": scale,
            "peak_scale": peak,
            "halvings": round(fallen, 2),
            "consecutive": self._consecutive,
            "window": cfg.window,
            "overflows_in_window": len(self._overflows),
            "onset_step": self._episode.onset,
        }
        text = (
            f"The loss scale is {scale:g}, {fallen:.0f} halvings below its recent high of {peak:g}, "
            f"after {self._consecutive} overflow(s) in a row."
        )
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity=severity,
                signal=keys.AMP_SCALE,
                value=scale,
                baseline=peak,
                evidence=evidence,
                text=text,
            )
        ]

    def _remember(self, step: int, scale: float, overflowed: bool) -> None:
        start = step - self.config.window
        while self._peaks and (self._peaks[0][0] <= start or self._peaks[-1][1] <= scale):
            self._peaks.popleft() if self._peaks[0][0] <= start else self._peaks.pop()
        self._peaks.append((step, scale))
        while self._overflows and self._overflows[0] <= start:
            self._overflows.popleft()
        if overflowed:
            self._overflows.append(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "settled": self._settled,
            "consecutive": self._consecutive,
            "peaks": [list(p) for p in self._peaks],
            "overflows": list(self._overflows),
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = LossScaleThrashConfig(**state["config"])
        self._settled = bool(state["settled"])
        self._consecutive = int(state["consecutive"])
        self._peaks = deque((int(s), float(v)) for s, v in state["peaks"])
        self._overflows = deque(int(s) for s in state["overflows"])
        self._episode.load_state_dict(state)
