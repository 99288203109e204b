"""Activation-growth detector: block outputs rising towards the largest value of the precision, before they overflow.

Reads the headroom left before overflow, in doublings: the least of the activation members of
``numerics/headroom/<kind>/<name>`` (`keel.signals.numerics`: log2 of the dtype's max over the largest |x|, measured in
the dtype each tensor really has; kinds ``act``, ``logits`` and ``fp8_in``, never ``grad``: with
``NumericsProbe(scaler=)`` scaled gradients sit near fp16's max by design) when a step logs the family — the headline
``numerics/headroom`` only from a log that never stores the family, since it is the least over gradients too — else the
activation probe's ``act/max_abs`` (`keel.signals.activation_rms`: the largest |block output|, until the numerics
probe's first measurement, from which the series is the numerics headroom alone) against ``format_max`` when set,
else the probe's ``act/format_max`` (the format the outputs are held in: fp16 under fp16 autocast, 3.4e38 for a
float32 or bf16 model, which then never warns), else fp16's 65504 — the narrowest range activations are commonly
kept in — said in the finding (``format_assumed``; a log from an older keel). Silent without either key: the
activation probe is in ``probes="transformer"``, not in the default set.

The rule, on the Theil–Sen slope of the headroom over the last ``window`` measurements (a rate in doublings per
step, which one noisy batch does not fake):

- **warning**: headroom ≤ ``warn_headroom`` doublings (1024 in fp16) and, at the current rate, none left within
  ``horizon`` steps, for ``patience`` measurements in a row;
- **critical**: the same with headroom ≤ ``critical_headroom`` (within a factor 2 of the max).

Both need the growth: a level alone is not an alarm, because healthy models carry large activations that stay put
("massive activations" of a few thousand in LLMs). Healthy runs of keel's zoo stay ≥ 7 doublings from fp16's max
(docs/low_precision.md). A finding names the block with the largest |output| when the step stored the per-block
family, and projects the step at which the max is reached (``projected_critical_step``). Each severity is reported
once per episode; an episode ends when the headroom is back above ``warn_headroom`` + 1.

References:
    Micikevicius et al. 2018, "Mixed Precision Training", arXiv 1710.03740 (fp16's range; keep reductions in fp32);
    Zhang et al. 2022, "OPT", arXiv 2205.01068 (activation norms rising before divergence);
    Wortsman et al. 2023, arXiv 2309.14322 (growth at high learning rates; small-scale proxies).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints
from keel.detect._drift import Drift, project
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect._worst_member import worst_member
from keel.detect.detector import DETECTORS

FP16_MAX = 65504.0  # torch.finfo(torch.float16).max; detect/ reads observations and imports no torch
SOURCES = (keys.NUMERICS_HEADROOM, keys.ACT_MAX_ABS)
# numerics-probe members that are activations (`NumericsProbe` names them ``<kind>/<name>``); ``grad/`` is not one
ACTIVATION_KINDS = ("act/", "logits/", "fp8_in/")
NOISE_FLOOR = 1e-3  # doublings: a series exactly constant has no noise to compare its slope with


@dataclass(kw_only=True)
class ActivationGrowthConfig:
    """Settings of the activation-growth detector.

    Attributes:
        format_max: Largest finite value of the precision ``act/max_abs`` is judged against; None: the probe's
            ``act/format_max``, else 65504 (fp16). Not used on steps that log ``numerics/headroom``, which knows each
            tensor's dtype.
        window: Measurements in the slope of the headroom.
        min_points: Measurements needed before the slope is trusted.
        warn_headroom: Doublings left (log2 of max / largest |x|) from which growth counts.
        critical_headroom: Doublings left from which growth is critical.
        horizon: Steps within which, at the current rate, the max must be reached for growth to count.
        min_trend_z: How far the window's fall in headroom must stand out of its noise (in standard errors).
        min_rise: Doublings the window must have risen by along its slope (0.25: ×1.19).
        patience: Consecutive qualifying measurements before a finding.
    """

    format_max: float | None = None
    window: int = 20
    min_points: int = 8
    warn_headroom: float = 6.0
    critical_headroom: float = 1.0
    horizon: int = 200
    min_trend_z: float = 3.0
    min_rise: float = 0.25
    patience: int = 3

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "window", "min_points", minimum=3)
        require_ints(self, "horizon", "patience")
        if self.min_points > self.window:
            raise ValueError(
                f"ActivationGrowthConfig.min_points={self.min_points!r}; allowed: an int <= window ({self.window})"
            )
        if self.format_max is not None and not (
            isinstance(self.format_max, int | float) and 0 < self.format_max < math.inf
        ):
            raise ValueError(f"ActivationGrowthConfig.format_max={self.format_max!r}; allowed: a finite number > 0")
        for name in ("warn_headroom", "critical_headroom", "min_trend_z", "min_rise"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < math.inf):
                raise ValueError(f"ActivationGrowthConfig.{name}={value!r}; allowed: a finite number >= 0")
        if self.critical_headroom > self.warn_headroom:
            raise ValueError(
                f"ActivationGrowthConfig.critical_headroom={self.critical_headroom!r}; "
                f"allowed: a number <= warn_headroom ({self.warn_headroom})"
            )


@DETECTORS.register("activation_growth")
class ActivationGrowthDetector:
    """Flags activations rising towards the precision's max before they overflow; names the block.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = ActivationGrowthDetector()
        >>> act = [50.0] * 20 + [50.0 * 1.1 ** k for k in range(1, 75)]   # steady, then ×1.1 per step
        >>> [(f.step, f.severity) for s, v in enumerate(act)
        ...  for f in det.update(Observation(step=s, values={keys.ACT_MAX_ABS: v}))]
        [(53, 'warning'), (88, 'critical')]
    """

    name = "activation_growth"
    reads = SOURCES  # `keel.detect.scan.ReadsKeys`
    rests_when_finite = False

    def __init__(self, config: ActivationGrowthConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, ActivationGrowthConfig, config, fields)
        self._trend = Drift(points=1, window=self.config.window)  # headroom in doublings; its slope and noise
        self._episode = Episode()
        # the key the headroom is read from: one series never mixes the two, and numerics/headroom, once logged, wins
        self._source: str | None = None
        self._family = False  # numerics/headroom/ has been seen: a step without it is not read (its headline has grads)

    def _headroom(self, obs: Observation) -> float | None:
        """This step's headroom in doublings, from the run's source; None when the step logs neither key (or only
        ``act/max_abs`` once ``numerics/headroom`` has been seen)."""
        measured = obs.values.get(keys.NUMERICS_HEADROOM)
        if measured is not None:
            if self._source != keys.NUMERICS_HEADROOM:  # it knows the dtype: it replaces the activation probe's series
                self._source = keys.NUMERICS_HEADROOM
                self._trend = Drift(points=1, window=self.config.window)
                self._episode.close()
            members = _activation_members(obs)
            if members is None:  # a step without the family: its headline is usable only from a log that never has it
                return None if self._family else measured
            self._family = True
            if not members:
                return None  # the probe watches no activation (``activations=False, logits=False``): nothing to judge
            finite = [v for v, _ in members if not math.isnan(v)]
            return min(finite) if finite else math.nan
        top = obs.values.get(keys.ACT_MAX_ABS)
        if top is None or self._source == keys.NUMERICS_HEADROOM:
            return None
        self._source = keys.ACT_MAX_ABS
        limit = self._format_max(obs)
        # log2 of a non-positive or non-finite max is not a headroom: NaN, which the trend window skips
        return math.log2(limit / top) if math.isfinite(top) and top > 0 else math.nan

    def _format_max(self, obs: Observation) -> float:
        """The largest value ``act/max_abs`` is judged against: the config's, the probe's, else fp16's."""
        if self.config.format_max is not None:
            return self.config.format_max
        held = obs.values.get(keys.ACT_FORMAT_MAX)
        return held if held is not None and 0 < held < math.inf else FP16_MAX

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        h = self._headroom(obs)
        if h is None or not self._trend.add(obs.step, h):
            return []
        if h > cfg.warn_headroom + 1.0:  # one doubling of hysteresis: a level hovering at the gate does not re-alarm
            self._episode.close()
            return []
        if len(self._trend.values()) < cfg.min_points:
            return []
        rate = -self._trend.slope()  # doublings of growth per step
        ahead = h / rate if rate > 0 else math.inf
        # the fall of the headroom over the window must stand out of its step-to-step noise: near the max, a flat
        # but noisy level has a slope whose projection is short by chance
        rise = rate * (obs.step - self._trend.first_step()) if rate > 0 else 0.0  # doublings over the window
        significant = rise >= cfg.min_rise and -self._trend.trend_z(floor=NOISE_FLOOR) >= cfg.min_trend_z
        if not (h <= cfg.warn_headroom and significant and ahead <= cfg.horizon):
            self._episode.break_run()
            return []
        self._episode.qualify(onset=obs.step)
        severity = self._episode.escalate(
            critical=h <= cfg.critical_headroom and self._episode.run >= cfg.patience,
            warning=self._episode.run >= cfg.patience,
        )
        return [] if severity is None else [self._finding(obs, severity, h, rate, ahead)]

    def _finding(self, obs: Observation, severity: Severity, h: float, rate: float, ahead: float) -> Finding:
        cfg = self.config
        measured = self._source == keys.NUMERICS_HEADROOM
        # the activation with the least headroom (``act/<block>``, ``logits/<head>``...), or the block with the largest
        # |output|, when the step stored the family
        block = _least_activation(obs) if measured else worst_member(obs, keys.ACT_MAX_ABS_PER_BLOCK)
        top = obs.values.get(keys.ACT_MAX_ABS)
        evidence: dict[str, Any] = {
            "headroom_doublings": round(h, 4),
            "rate_doublings_per_step": round(rate, 5),
            "doubling_steps": round(1.0 / rate, 2),
            "onset_step": self._episode.onset_or(obs.step),
            "source": self._source,
        }
        limit_value = self._format_max(obs)
        if not measured:
            evidence["format_max"] = limit_value
            if cfg.format_max is None and obs.values.get(keys.ACT_FORMAT_MAX) is None:
                evidence["format_assumed"] = True  # the step did not say which format: fp16, the narrowest
        if top is not None and math.isfinite(top):
            evidence["act_max_abs"] = round(top, 4)
        if block is not None:
            evidence["block"] = block
        project(evidence, obs.step, ahead)  # the step the max is reached: steps_to_critical, projected_critical_step
        where = f" in {block}" if block else ""
        limit = "the dtype's max" if measured else f"{limit_value:g}"
        text = (
            f"Activations{where} are {h:.2f} doublings below {limit} and rising (×2 every {1.0 / rate:.0f} steps); "
            + (f"at this rate they overflow in ~{ahead:.0f} steps." if ahead >= 0 else "they are past it.")
        )
        return explained_finding(
            step=obs.step,
            kind=self.name,
            severity=severity,
            signal=self._source or keys.ACT_MAX_ABS,
            value=self._raw(h, limit_value),
            baseline=self._raw(self._trend.values()[0], limit_value),  # where the window's growth started
            evidence=evidence,
            text=text,
        )

    def _raw(self, h: float, limit: float) -> float:
        """A headroom in the source's own unit: itself for ``numerics/headroom``, |x| below ``limit`` for
        ``act/max_abs``."""
        return h if self._source == keys.NUMERICS_HEADROOM else limit * 2.0**-h

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "trend": self._trend.state_dict(),
            **self._episode.state_dict(),
            "source": self._source,
            "family": self._family,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = ActivationGrowthConfig(**state["config"])
        self._trend.load_state_dict(state["trend"])
        self._episode.load_state_dict(state)
        source = state.get("source")
        if source not in (None, *SOURCES):
            raise ValueError(f"ActivationGrowthDetector state source={source!r}; allowed: None, {', '.join(SOURCES)}")
        self._source = source
        self._family = bool(state.get("family", False))  # a state from before the family was read: not seen yet


def _activation_members(obs: Observation) -> list[tuple[float, str]] | None:
    """The (headroom, name) of this step's activation members of ``numerics/headroom/`` (`ACTIVATION_KINDS`); None
    when the step does not have the family."""
    family = obs.per_param.get(keys.NUMERICS_HEADROOM_PER_NAME)
    if family is None:
        return None
    names, values = family
    return [(float(v), n) for n, v in zip(names, values, strict=False) if n.startswith(ACTIVATION_KINDS)]


def _least_activation(obs: Observation) -> str | None:
    """The activation member with the least finite headroom this step, or None without one."""
    finite = [(v, n) for v, n in _activation_members(obs) or () if math.isfinite(v)]
    return min(finite)[1] if finite else None
