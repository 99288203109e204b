"""Divergence detector: a sustained rise of the loss above the best level it had reached, beyond the run's noise.

Compares a rolling median of the loss (robust to single outliers) with the lowest such median seen so far.
A rise of ``warn_excess`` lasting ``patience`` steps is a ``warning``; reaching ``critical_excess`` is
``critical`` — skipping steps cannot fix it; rolling back and lowering the learning rate can (PaLM, OPT-175B
logbooks: restart earlier with a lower LR). This catches the slow divergence that single-step spike rules
miss (llm-foundry's "persistently high loss" rule addresses the same gap).

The judgement scales with the run's own noise. A fine-tune with batches of one or two heterogeneous examples
swings by ±30 % from step to step; the lowest of many 9-step medians is then a lucky stretch, and the
ordinary level sits well above it. So the detector measures the step-to-step noise (`robust.step_noise` of the
log-loss: ratios, so a loss falling to 0.1 keeps its scale, and differences, so epoch-boundary drops and
trends are not counted as noise), and

- takes the median over as many steps as that noise needs (``short`` for a quiet run, up to ``window``): a
  median's standard error shrinks with √n (`robust.median_standard_error`);
- counts a rise only when it is also ``noise_margin`` standard errors of the difference between the current
  median and the best one (each with its own count and noise), which covers the best being the luckiest of
  many medians.

A run quiet enough for a ``short`` median (pre-training with large batches) is judged exactly as before. The
noise estimate is frozen while a rise is pending, so a divergence does not widen its own margin.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import require_ints, require_positive
from keel.detect._running_median import RunningMedian
from keel.detect.detector import DETECTORS
from keel.detect.robust import median_standard_error, relative_excess, step_noise_of

NOISE_SPAN = 256  # step-to-step differences behind the noise estimate
NOISE_EVERY = 16  # steps between noise re-estimates (the window follows, and a window resize sorts it)
WINDOW_GROWTH = 1.25  # window sizes form a ladder short, ×1.25, ×1.25², …: re-sorting a window is rare


@dataclass(kw_only=True)
class DivergenceConfig:
    """Settings of the divergence detector.

    Attributes:
        signal: The signal key watched (a loss: lower is better).
        short: Fewest values in the rolling median: a quiet run's window.
        window: Most values in the rolling median: a noisy run's window (its detection delay is about half).
        min_history: Steps before anything is flagged (the loss falls fast early on).
        warn_excess: Relative rise over the best median that counts (0.25 = 25 % above the best).
        critical_excess: Relative rise that makes the finding critical (1.0 = twice the best).
        patience: Consecutive steps above the threshold before a finding.
        noise_margin: Standard errors of the difference between the current and the best median a rise must
            also exceed; the window grows until ``warn_excess`` is that many standard errors.
    """

    signal: str = keys.LOSS
    short: int = 9
    window: int = 255
    min_history: int = 50
    warn_excess: float = 0.25
    critical_excess: float = 1.0
    patience: int = 10
    noise_margin: float = 5.5

    def __post_init__(self) -> None:
        require_ints(self, "short", "window", "min_history", "patience")
        require_positive(self, "warn_excess", "critical_excess", "noise_margin")
        if self.window < self.short:
            raise ValueError(f"DivergenceConfig.window={self.window!r} < short={self.short!r}; allowed: >= short")
        if not 0 < self.warn_excess <= self.critical_excess:
            raise ValueError(
                f"DivergenceConfig.warn_excess={self.warn_excess!r}, critical_excess={self.critical_excess!r}; "
                "allowed: 0 < warn_excess <= critical_excess"
            )


@DETECTORS.register("divergence")
class DivergenceDetector:
    """Flags a loss that has risen well above its best level, beyond its own noise, and stays there.

    Example:
        >>> from keel._core import Observation
        >>> det = DivergenceDetector()
        >>> losses = [2.0] * 60 + [6.0] * 20
        >>> found = [f for s, v in enumerate(losses) for f in det.update(Observation(step=s, values={"loss": v}))]
        >>> [(f.step, f.severity) for f in found]
        [(73, 'critical')]
    """

    name = "divergence"

    def __init__(self, config: DivergenceConfig | None = None) -> None:
        self.config = config or DivergenceConfig()
        self._level = RunningMedian(size=self.config.short, capacity=self.config.window)
        self._recent = RunningMedian(size=self.config.short, capacity=self.config.short)  # the fast view's values
        self._diffs: deque[float] = deque(maxlen=NOISE_SPAN)
        self._spread = RunningMedian(size=NOISE_SPAN, capacity=NOISE_SPAN)  # abs(diffs), kept sorted for the noise
        self._noise = math.nan  # step-to-step noise, log units (relative units for a non-positive loss)
        self._seen = 0
        self._best = math.inf
        self._best_step = -1
        self._best_se = 0.0  # the best median's standard error when it was measured
        self._run = 0
        self._reported: Severity | None = None
        self._margin_key: tuple[Any, ...] = ()
        self._margin_config: DivergenceConfig | None = None
        self._margin = (0.0, 0.0, 0.0)

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not math.isfinite(x):
            return []
        if self._level.values and self._run == 0:  # a pending rise must not widen its own margin
            diff = _relative_change(self._level.values[-1], x)
            self._diffs.append(diff)
            self._spread.push(abs(diff))
        self._level.push(x)
        self._recent.push(x)
        self._seen += 1
        if len(self._diffs) >= cfg.short and (self._seen % NOISE_EVERY == 0 or math.isnan(self._noise)):
            self._noise = step_noise_of(self._spread.median())  # robust.step_noise(self._diffs), without a sort
            self._resize(self._window_for(self._noise))
        n = len(self._level)
        if n < cfg.short or math.isnan(self._noise):
            return []  # no best before the noise is known: an early median of a noisy run is a lucky one
        median = self._level.median()
        se, required, fast_required = self._margins(n)
        # The best is a median over the full window the noise asks for, and a more precise one wins a near tie
        # (lower by one standard error): the lowest of many imprecise medians is luck, not a level reached.
        if n == self._level.size and median + se < self._best + self._best_se:
            self._best, self._best_step, self._best_se = median, obs.step, se
            se, required, fast_required = self._margins(n)
        # Two views of the current level: the noise's window, and the last ``short`` steps, whose larger margin
        # a steep rise clears long before the wide median moves (a blow-up is not made to wait for it).
        rise = _rise(median, self._best)
        if n > cfg.short:
            fast = self._recent.median()
            fast_rise = _rise(fast, self._best)
            if fast_rise - fast_required > rise - required:  # judge by the view furthest past its threshold
                median, rise, required, n = fast, fast_rise, fast_required, cfg.short
        if self._seen < cfg.min_history or rise < required:
            if rise < required / 2:  # hysteresis: the episode ends once the loss is back down
                self._run, self._reported = 0, None
            return []
        self._run += 1
        if self._run < cfg.patience:
            return []
        severity: Severity = "critical" if rise >= math.log1p(cfg.critical_excess) else "warning"
        if self._reported == severity or self._reported == "critical":
            return []
        self._reported = severity
        excess = (median - self._best) / (abs(self._best) + 1e-12)
        evidence = {"median": round(median, 6), "best": round(self._best, 6), "best_step": self._best_step,
                    "excess": round(excess, 4), "onset_step": obs.step - self._run + 1,
                    "window": n, "noise": round(self._noise, 4),
                    "required_excess": round(relative_excess(required), 4)}
        noisy = (f" (the loss swings ±{relative_excess(self._noise):.0%} per step; the median of {n} steps is judged "
                 f"against that)" if len(self._level) > cfg.short else "")
        cause = (f"The loss's running median has stayed {1 + excess:.3g}× its best level (step "
                 f"{self._best_step}) for {self._run} steps{noisy}: training is diverging, not spiking.")
        remedy = ("Roll back to a snapshot before the onset and continue with a lower learning rate "
                  "(policy='recover'; PaLM and OPT-175B restarted earlier with a lower LR); check attention "
                  "logits and consider QK-norm and z-loss (Wortsman et al. 2023).")
        return [Finding(step=obs.step, kind="divergence", severity=severity, signal=cfg.signal, value=median,
                        baseline=self._best, evidence=evidence, cause=cause, remedy=remedy)]

    def _resize(self, size: int) -> None:
        """Change the window; a wider one reaches further back, so on a falling loss its median is higher.

        That is a change in how the level is measured, not in the level: the best moves with it, so the
        widening itself never reads as a rise.
        """
        if size == self._level.size:
            return
        before = self._level.median()
        self._level.resize(size)
        after = self._level.median()
        if math.isfinite(self._best) and after > before:
            self._best += after - before if self._best <= 0 or before <= 0 else self._best * (after / before - 1)

    def _margins(self, n: int) -> tuple[float, float, float]:
        """(standard error of a median of ``n``, the rise it must show over the best, the same for the short view).

        A rise must clear the warn level and ``noise_margin`` standard errors of the difference between the two
        medians. Cached: the inputs change only when the noise is re-estimated or the best is replaced.
        """
        key = (self._noise, n, self._best_se)
        if key != self._margin_key or self._margin_config is not self.config:
            cfg = self.config
            se = median_standard_error(self._noise, n)
            warn = math.log1p(cfg.warn_excess)
            required = max(warn, cfg.noise_margin * math.hypot(se, self._best_se))
            fast = max(warn, cfg.noise_margin * math.hypot(median_standard_error(self._noise, cfg.short),
                                                           self._best_se))
            self._margin_key, self._margin_config, self._margin = key, self.config, (se, required, fast)
        return self._margin

    def _window_for(self, noise: float) -> int:
        """The smallest window on the ladder (within [short, window]) whose median's margin fits ``warn_excess``."""
        cfg = self.config
        target = math.log1p(cfg.warn_excess) / (cfg.noise_margin * math.sqrt(2))  # the standard error wanted
        try:
            needed = (median_standard_error(noise, 1) / target) ** 2
        except OverflowError:  # noise of 1e300 (a loss crossing 0 at 1e300): the widest window
            needed = math.inf
        n = cfg.short
        while n < needed and n < cfg.window:
            # odd: the median is a value, so log and ratio agree; n + 1: a rung under 4 would not grow
            n = min(max(int(n * WINDOW_GROWTH), n + 1) | 1, cfg.window)
        return n

    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "recent": list(self._level.values), "size": self._level.size,
                "diffs": list(self._diffs), "noise": self._noise, "seen": self._seen, "best": self._best,
                "best_step": self._best_step, "best_se": self._best_se, "run": self._run,
                "reported": self._reported}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = DivergenceConfig(**state["config"])
        size = min(int(state.get("size", self.config.short)), self.config.window)
        self._level = RunningMedian(size=size, capacity=self.config.window, values=state["recent"])
        self._recent = RunningMedian(size=self.config.short, capacity=self.config.short, values=state["recent"])
        self._diffs = deque(state.get("diffs", ()), maxlen=NOISE_SPAN)
        self._spread = RunningMedian(size=NOISE_SPAN, capacity=NOISE_SPAN, values=map(abs, self._diffs))
        self._noise = float(state.get("noise", math.nan))
        self._seen, self._best, self._best_step = state["seen"], state["best"], state["best_step"]
        self._best_se = float(state.get("best_se", 0.0))
        self._run, self._reported = state["run"], state["reported"]


def _relative_change(before: float, after: float) -> float:
    """log(after / before) for positive values; else the change relative to ``before``'s magnitude."""
    if before > 0 and after > 0:
        return _log_ratio(after, before)
    return (after - before) / max(abs(before), 1e-12)


def _rise(median: float, best: float) -> float:
    """How far ``median`` is above ``best``, in the units of `_relative_change`."""
    if median > 0 and 0 < best < math.inf:
        ratio = median / best  # (the common case, inlined: this runs on every step)
        return math.log(ratio) if ratio > 0 else _log_ratio(median, best)
    return _relative_change(best, median) if math.isfinite(best) else -math.inf


def _log_ratio(a: float, b: float) -> float:
    """log(a / b) of positive finite values, also where a / b underflows to 0 (log would raise)."""
    ratio = a / b
    return math.log(ratio) if ratio > 0 else math.log(a) - math.log(b)
