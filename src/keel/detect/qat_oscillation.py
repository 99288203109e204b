"""QAT oscillation detector: a large share of a layer's quantized weights flipping back and forth between two codes.

Reads ``qat/oscillation`` (`keel.signals.WeightOscillationProbe`: the largest share, over the fake-quantized layers,
of weights whose oscillation EMA exceeds the probe's threshold, i.e. that reverse their integer code more than about
once per 50 steps); silent without it. The probe is opt-in (``probes=[..., "weight_oscillation"]``): it holds
~6 bytes per quantized weight.

Some oscillation is normal in quantization-aware training: the straight-through estimator lets every weight next to
a rounding boundary cross it at whatever step its gradient's sign changes, and with Adam a weight moves by about
the LR each step, so the share grows with the ratio of the LR to the grid's step (finer grids, higher LRs). What
OFQ and Nagel et al. call harmful is a large part of a layer that never settles: its quantized weights are a
random side of the boundary at any step, the statistics downstream (norms, the next layer's inputs) keep moving,
and the final quantized network is a snapshot of noise. One rule:

- **warning**: the share is at least ``level`` for ``patience`` measurements in a row (one per step); the finding
  names the layer with the largest share (on steps that log the per-layer family). The episode closes once the
  share falls below ``level`` × ``release``.

There is no critical: oscillation costs accuracy, not the run, and a rollback cannot remove it (an LR cool-down,
confident-weight freezing — `keel.optim.ConfidenceGuidedAnnealing` — or a StatsQ grid can).

References:
    Liu et al. 2023, Oscillation-free Quantization for Low-bit Vision Transformers (OFQ), ICML, arXiv 2302.02210;
    Nagel et al. 2022, Overcoming Oscillations in Quantization-Aware Training, ICML, arXiv 2203.11086.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect._worst_member import worst_member
from keel.detect.detector import DETECTORS
from keel.detect.scan import ReadsOneSignal

KIND = "qat_oscillation"


@dataclass(kw_only=True)
class QatOscillationConfig:
    """Settings of the QAT oscillation detector.

    Attributes:
        signal: The share watched (largest over the quantized layers).
        level: Share of a layer's weights oscillating that counts.
        patience: Consecutive measurements at or above ``level`` before a warning.
        release: The episode closes when the share falls below ``level × release``.
    """

    signal: str = keys.QAT_OSCILLATION
    level: float = 0.4
    patience: int = 20
    release: float = 0.8

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "patience")
        for name in ("level", "release"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 1):
                raise ValueError(f"QatOscillationConfig.{name}={value!r}; allowed: a number in (0, 1]")


@DETECTORS.register("qat_oscillation")
class QatOscillationDetector(ReadsOneSignal):
    """Warns when a fake-quantized layer keeps a large share of its weights oscillating between two codes.

    Example:
        >>> det = QatOscillationDetector(patience=3)
        >>> share = [0.1] * 5 + [0.5] * 5
        >>> [(f.step, f.severity) for s, x in enumerate(share) for f in det.update(Observation(step=s, values={
        ...     keys.QAT_OSCILLATION: x}))]
        [(7, 'warning')]
    """

    name = "qat_oscillation"

    def __init__(self, config: QatOscillationConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, QatOscillationConfig, config, fields)
        self._episode = Episode()

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not math.isfinite(x):
            return []
        if x < cfg.level:
            if x < cfg.level * cfg.release:
                self._episode.close()
            else:
                self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        if self._episode.escalate(critical=False, warning=self._episode.run >= cfg.patience) is None:
            return []
        evidence: dict[str, Any] = {"share": round(x, 4), "level": cfg.level, "onset_step": self._episode.onset}
        layer = worst_member(obs, keys.QAT_OSCILLATION_PER_LAYER)
        if layer is not None:
            evidence["layer"] = layer
        text = (
            f"{x:.0%} of a quantized layer's weights{f' ({layer})' if layer else ''} keep flipping between two "
            f"integer codes (more than ~1 reversal per 50 steps), for {self._episode.run} steps."
        )
        return [
            explained_finding(
                step=obs.step,
                kind=KIND,
                severity="warning",
                signal=cfg.signal,
                value=x,
                baseline=cfg.level,
                evidence=evidence,
                text=text,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), **self._episode.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = QatOscillationConfig(**state["config"])
        self._episode.load_state_dict(state)
