"""Normalization-statistics jump: one batch that moved a BatchNorm layer's running variance far, caught before its
update is applied.

Reads ``norm/running_var_jump`` (`keel.signals.norm_stats`: per layer, ``‖running_var‖`` after this step's forward
over its value after the last applied update; the largest over layers) and, when stored, the per-layer values to
name the layer. A finite batch far outside the data's scale leaves the loss and the gradient norm normal (train-mode
BatchNorm normalizes with the batch's own statistics) but poisons the running statistics every eval-mode forward
uses: a CIFAR-style ResNet with one batch of pixels ×1e4 has its first layer's ``running_var`` ×1e7, and keel's loss
and gradient detectors found nothing. Critical from ``critical`` (20) on: a finding a skip mends
(`keel.detect._finding.SKIPPABLE_KINDS`): under ``skip`` and ``recover`` the update is not applied and the
statistics are put back (`keel.recover.running_stats`).

Thresholds, from measurements (keel h27 B): healthy runs at BatchNorm's default momentum (0.1) —
CNNs and MLPs at three learning rates, batch sizes 2 to 32, inputs left unnormalized (pixels 0–255) from the first
step, eval-mode steps between — stay at or below 3.6; the probe takes its reference after the first batch, so a
layer's move from its initial variance to the data's is never judged. One batch of inputs ×10 reads 10.5 (a CNN,
``warning``) to 37 (an MLP at batch size 2, critical), ×100 250–3700, ×1e4 2.5e6–3.7e7. A high BatchNorm momentum
with a batch of 2 is noisier: 8.7 at momentum 0.9, 17.5 for a 2-channel BatchNorm1d at momentum 0.5 (warnings).

A batch of constant images (variance 0) lowers the running variance by at most the momentum (×0.9): not seen here,
nor harmful. A NaN batch is the non-finite detector's. A run of ``accept_after`` jumps in a row (under ``skip``: the
statistics put back each time, so a lasting change of the data's scale jumps again at every step) is taken as the
data's own scale at the last of them — a ``warning`` whose update is applied — so a deliberate change costs
``accept_after - 1`` skipped updates, never a run of skips that ends the run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS

KIND = "norm_stats_jump"


@dataclass(kw_only=True)
class NormStatsJumpConfig:
    """Settings of the normalization-statistics jump detector.

    Attributes:
        warning: A step whose largest running-variance ratio is at least this is a warning.
        critical: At least this: critical (the update is skipped under ``skip``/``recover``).
        accept_after: The ``accept_after``-th critical jump in a row is taken as the data's own scale (a warning).
    """

    warning: float = 8.0
    critical: float = 20.0
    accept_after: int = 3

    def __post_init__(self) -> None:
        check_types(self)
        if not (math.isfinite(self.warning) and self.warning > 1):
            raise ValueError(f"NormStatsJumpConfig.warning={self.warning!r}; allowed: a finite number > 1")
        if not (math.isfinite(self.critical) and self.critical >= self.warning):
            raise ValueError(
                f"NormStatsJumpConfig.critical={self.critical!r}; allowed: a finite number >= warning ({self.warning})"
            )
        require_ints(self, "accept_after", minimum=2)


@DETECTORS.register("norm_stats_jump")
class NormStatsJumpDetector:
    """Flags a step whose forward moved a normalization layer's running variance ``warning``/``critical`` times.

    Host-only: a comparison per step; silent for models without BatchNorm (no ``norm/running_var_jump``).

    Example:
        >>> from keel._core import Observation
        >>> det = NormStatsJumpDetector()
        >>> jumps = [1.0, 0.95, 1.02, 9.6e6, 1.0]  # one batch of pixels x1e4 at step 3
        >>> found = [f for s, j in enumerate(jumps) for f in det.update(Observation(step=s, values={
        ...     "norm/running_var_jump": j}))]
        >>> [(f.step, f.kind, f.severity) for f in found]
        [(3, 'norm_stats_jump', 'critical')]
    """

    name = "norm_stats_jump"
    reads = (keys.NORM_RUNNING_VAR_JUMP,)
    rests_when_finite = False

    def __init__(self, config: NormStatsJumpConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, NormStatsJumpConfig, config, fields)
        self._in_a_row = 0  # critical jumps on consecutive steps, up to the last step judged
        self._last_step: int | None = None

    def update(self, obs: Observation) -> list[Finding]:
        jump = obs.values.get(keys.NORM_RUNNING_VAR_JUMP)
        if jump is None:
            return []
        consecutive = self._last_step is not None and obs.step == self._last_step + 1
        self._last_step = obs.step
        in_a_row = self._in_a_row if consecutive else 0
        self._in_a_row = 0
        if not (math.isfinite(jump) and jump >= self.config.warning):
            return []  # NaN/Inf: the non-finite detector's
        if jump < self.config.critical:
            return [self._finding(obs, jump, "warning", accepted=False)]
        self._in_a_row = in_a_row + 1
        accepted = self._in_a_row >= self.config.accept_after
        if accepted:
            self._in_a_row = 0
        return [self._finding(obs, jump, "warning" if accepted else "critical", accepted=accepted)]

    def _finding(self, obs: Observation, jump: float, severity: Severity, *, accepted: bool) -> Finding:
        layer = _largest_layer(obs)
        where = f" of {layer}" if layer else ""
        text = (
            f"This step's batch moved the running variance{where} {jump:.3g}x in one forward (healthy steps: under "
            f"~4x once the first batch is in)."
        )
        if accepted:
            text += (
                f" It is the {self.config.accept_after}th such step in a row: keel takes it as the data's own scale "
                "and lets the update and its statistics in."
            )
        return explained_finding(
            step=obs.step,
            kind=KIND,
            severity=severity,
            signal=keys.NORM_RUNNING_VAR_JUMP,
            value=jump,
            baseline=1.0,
            evidence={
                "ratio": round(jump, 6),
                "layer": layer,
                "warning": self.config.warning,
                "critical": self.config.critical,
                "accepted": accepted,
            },
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "in_a_row": self._in_a_row, "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = NormStatsJumpConfig(**state["config"])
        self._in_a_row = int(state["in_a_row"])
        self._last_step = None if state["last_step"] is None else int(state["last_step"])


def _largest_layer(obs: Observation) -> str | None:
    """The layer with the largest ratio, when this step stored the per-layer values."""
    names, values = obs.per_param.get(keys.NORM_RUNNING_VAR_JUMP_PER_LAYER, ((), []))
    finite = [(v, n) for n, v in zip(names, values, strict=True) if math.isfinite(v)]
    return max(finite)[1] if finite else None
