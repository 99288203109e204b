"""Spike detector: a robust online z-score for one signal (loss or gradient norm).

The baseline is the median and MAD of the last ``window`` accepted values; flagged steps are kept out of it
(metaseq's ``skip_spike`` keeps its EWM clean the same way; OLMo-core's does not, so one spike inflates its
std for 128 steps). Severity follows magnitude and persistence:

- one step far above baseline → ``info`` (a one-batch data outlier: worth knowing, no alarm),
- ``patience`` consecutive spike steps, their median at least ``warn_excess`` above the baseline → ``warning``
  (the model changed, not one batch); a smaller lasting shift stays ``info``: a corpus read in order moves a
  healthy loss's level by 14–20 % for a few steps as the text changes (build-nanogpt's DataLoaderLite), 8 robust
  z on a smooth window,
- an extreme jump (``critical_z`` and ``critical_excess`` both passed) → ``critical`` (a policy may skip the
  update: OLMo-core ``SkipStepOptimizer``, llm.c PR #637).

A level shift that lasts ``rebase_after`` steps becomes the new baseline, so a lasting change yields one
episode rather than an alarm on every step (rlwatch's and arc-vigil's "alarm forever" failure,
two small PyPI monitors). Sustained rises are the divergence detector's job.

Both judgements are made against the run's own noise. A positive loss is compared in log space, where a
fine-tune's ±30 % swings between easy and hard batches are symmetric and keep their size as the loss falls to
0.1; in linear units the long right tail of such multiplicative noise reaches 12 MADs (at ±50 % per step,
about one healthy step in 6,000 was ``critical``). And a run whose own one-step outliers are large —
heavy-tailed batches — needs a step ``tail_factor`` times further out (in log units) than the largest of its
recent ones before it is ``critical``: a batch like those the run has shrugged off is no reason to skip.

**Before the baseline exists** (fewer than ``min_history`` accepted values: a run's first steps, a short log) a
positive signal is judged against the (at least ``warmup_points``) values accepted so far, their median and MAD, and
only a jump far beyond them counts: ``threshold`` robust z and at least ``1 + warmup_excess`` times their median. A
loss falling fast or a gradient norm largest at step 0 never rises above its own median; a trend (a warm-up LR ramp,
a norm growing from a zero-initialised layer) spreads the few values enough that a step along it is a few z; a
fine-tune whose LR is 1000× too high from step 10 (loss 4.5 → 20 → 40 → 156, HF run_clm, h23 H12) is flagged at
once, ten steps before the baseline would exist.

**A lasting level shift within the noise.** A small-batch run's steps swing by ±100 % (a log-loss MAD of 0.77 on a
timm ResNet at batch 8), so one step 9× above the median is only 3 robust z and never a spike, even when the level
stays there (an LR ×100 for one update: 0.75 → 6.7, then 3–5 for 19 steps; h23 T). So each accepted value also
compares the median of the last ``shift_span`` values (it and the ones before it) with the median of the window's
older values — two disjoint samples, so the new level does not hide in its own baseline. A rise of ``shift_z``
standard errors of their difference (`robust.median_standard_error`, the older values' robust scale) and at least
``1 + shift_excess`` times, at ``patience`` consecutive values, is a ``warning`` (the model changed, not one batch),
once until the recent median is back below half that rise. Five of nine values must lie that high three times in a
row: iid log-normal or t₃ noise of ±50–80 % per step does that about once in 200,000 steps, a one-batch outlier or a
slow drift never.

A steep descent (the first steps of a run: a linear regression's loss falling 45× in 40 steps) spreads the window
over its own trend, and a window's median and MAD then hide even a 1,500× jump (3.8 robust z). While the window is
such a descent (in log space: the median of its last ``RECENT`` values at least ``DESCENT`` robust scales below the
window's median — or its older half's, which still lies in a fall the plateau after it has outnumbered —, and the
window's spread at least ``TREND_SPREAD`` times its step-to-step noise, `robust.step_noise`,
which a trend hardly moves), a step is judged against that recent level and the step noise instead: a detrended
baseline that lags the descent by a few steps, so it errs high (towards silence). A rising window never qualifies
(sustained rises are the divergence detector's). The window need not be all descent: a run's first fast fall followed
by its plateau (minGPT's loss 5.7 → 2.8 in 20 steps, then flat; its gradient norm likewise) has a spread 2.1–2.5× its
step noise, and judged by that spread an LR ×100 for one update on the plateau (loss 2.2×, gradient norm 10×) was
3.1–3.7 robust z, no finding at all (h25 C5); against the plateau's level and step noise it is 9–10. An iid window of
64 values never reaches twice its step noise (at most 1.8× in 20,000 Gaussian or t₃ windows; about 1 in 1,000 of
20 values does, and is then judged against the same noise, measured differently). The step noise is the larger of
the window's and its last ``NOISE_NOW`` differences': a window whose first steps were noiseless (a DPO loss at exactly
ln 2 before the policy moves) would otherwise understate the noise the run has now.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypedDict

import numpy as np

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._running_median import RunningMedian
from keel.detect._spike_screen import possible_descent_spikes, possible_spikes
from keel.detect.detector import DETECTORS
from keel.detect.robust import median as median_of
from keel.detect.robust import (
    median_standard_error,
    relative_excess,
    robust_z,
    rolling_median,
    sorted_location_scale,
    step_noise,
)
from keel.detect.scan import SCAN_CHUNK, SCAN_CHUNK_MAX, as_series


@dataclass(kw_only=True)
class SpikeConfig:
    """Settings of one spike detector.

    Attributes:
        signal: The signal key watched.
        kind: The finding kind emitted (default: ``loss_spike`` for ``loss``, ``grad_spike`` for gradients).
        log_scale: Compare log-values (right for norms and positive losses, which move by factors); False:
            values relative to the median's magnitude; None: log-values while every value has been positive,
            relative values from the first that is not (a loss that may be zero or negative).
        window: Accepted values kept for the baseline.
        min_history: Accepted values needed before anything is flagged (warm-up).
        threshold: Robust z-score at or above which a step is a spike.
        min_excess: Relative excess over the median a spike must also have (0.1 = 10 % above); keeps a very
            smooth series from flagging tiny wiggles.
        scale_floor: Lower bound of the robust scale, relative to the median (linear) or in log units.
        patience: Consecutive spike steps that make a ``warning``.
        warn_excess: Relative excess the median of the last ``patience`` spike steps must have for a
            ``warning`` (0.25 = 25 % above the baseline, the divergence detector's ``warn_excess``). A smaller
            lasting shift is ``info``: a healthy run reading its corpus in order moves by 14–20 % for a few steps
            as the text changes (build-nanogpt's loss, h21 trial), and a smooth window makes that 8 robust z.
            The median, not the least: one big batch in a small shift does not make it a warning, and one
            small step in a growing rise (BigScience tr8-104B: 1.15×, 1.43×, 1.61×) does not delay it.
        critical_z: Robust z-score needed for ``critical``.
        critical_excess: Relative excess needed for ``critical`` (1.0 = twice the median). A loss that
            doubles in one step: real healthy LM runs show one-batch outliers up to 1.89× their recent median
            (modded-nanogpt 1.5B, 20k steps), so a ``critical`` — which lets a policy skip the update —
            needs more than any of them; `keel bench doctor` measures this on shared/data/realruns.
        rebase_after: Consecutive spike steps after which the new level becomes the baseline.
        tail_factor: A ``critical`` step must also lie this many times as far above the median (in log
            units: ``log(ratio)``) as the largest of the run's isolated one-step outliers of the last
            ``TAIL_SPAN`` steps (a heavy-tailed run's own noise).
        warmup_points: Accepted values after which, still short of ``min_history``, an extreme jump is flagged
            (log space only).
        warmup_excess: Relative excess over the median of the values accepted so far that a step needs to be a
            spike before ``min_history`` (3.0 = four times it); ``critical`` as usual beyond that.
        shift_span: Latest values whose median is the recent level of the level-shift test (0: no test); the test
            runs once at least as many older values are in the window (never with ``window < 2 * shift_span - 1``).
        shift_z: Standard errors of that median (of the window's robust scale) it must lie above the window's median.
        shift_excess: Relative excess of that median over the window's median that a level shift also needs
            (1.0 = twice the median).
        shift_lasting: Accepted values after the level-shift ``warning``, each still a full level shift, after which
            it is ``critical`` (0: never): the damage is in the weights, and ``policy="recover"`` rolls back to before
            the shift (`keel.recover.escalation`).
    """

    signal: str = keys.LOSS
    kind: str = ""
    log_scale: bool | None = None
    window: int = 64
    min_history: int = 20
    threshold: float = 6.0
    min_excess: float = 0.1
    scale_floor: float = 0.01
    patience: int = 3
    warn_excess: float = 0.25
    critical_z: float = 12.0
    critical_excess: float = 1.0
    rebase_after: int = 50
    tail_factor: float = 1.5
    warmup_points: int = 5
    warmup_excess: float = 3.0
    shift_span: int = 9
    shift_z: float = 5.0
    shift_excess: float = 1.0
    shift_lasting: int = 5

    def __post_init__(self) -> None:
        check_types(self)
        if not self.kind:
            self.kind = (
                "loss_spike"
                if self.signal == keys.LOSS
                else "grad_spike"
                if "grad" in self.signal
                else self.signal.replace("/", "_") + "_spike"
            )
        require_ints(self, "window", "min_history", "patience", "rebase_after", "warmup_points")
        require_ints(self, "shift_span", "shift_lasting", minimum=0)
        if self.min_history > self.window:
            raise ValueError(f"SpikeConfig.min_history={self.min_history} > window={self.window}; allowed: <= window")
        require_positive(
            self,
            "threshold",
            "critical_z",
            "min_excess",
            "warn_excess",
            "critical_excess",
            "scale_floor",
            "tail_factor",
            "warmup_excess",
            "shift_z",
            "shift_excess",
        )
        if self.log_scale not in (None, True, False):
            raise ValueError(f"SpikeConfig.log_scale={self.log_scale!r}; allowed: True, False or None")


# Gradient norms move by factors and are noisier than losses: compare in log space and ask for more.
# Critical at 20× the median: a healthy llm.c GPT-2 run has a one-step 15× grad-norm bump with no loss
# excursion (shared/data/realruns), while the labelled BigScience/BLOOM spikes reach 20×–4000×.
class _GradNormDefaults(TypedDict):
    log_scale: bool
    min_excess: float
    scale_floor: float
    critical_excess: float
    warmup_excess: float
    shift_span: int


# Before the baseline exists a gradient norm must jump 10× past every value seen (a healthy run's restart shifts it
# 2.7×, CPM-Ant's daily log in shared/data/realruns). No level-shift test: a healthy run's gradient norm rises and
# stays up on its own — a VAE whose summed loss grows 150× in size (pytorch/examples' vae: 4.7× at step 44), an
# actor-critic whose episodes lengthen, the end of an LLM run under a decaying LR (Defazio 2025, "Why
# Gradients Rapidly Increase Near the End of Training", arXiv 2506.02285) — while a lasting rise of the loss is
# trouble. The loss's test finds the damage (a timm run's LR ×100 at batch 8); give `shift_span` to test a norm too.
GRAD_NORM_DEFAULTS: _GradNormDefaults = {
    "log_scale": True,
    "min_excess": 1.0,
    "scale_floor": 0.05,
    "critical_excess": 19.0,
    "warmup_excess": 9.0,
    "shift_span": 0,
}
TAIL_SPAN = 1000  # steps an isolated outlier counts towards the run's own tail
TAIL_KEPT = 16  # isolated outliers remembered (the largest recent one is what counts)
LOG_ERROR = 1e-12  # NumPy's log against math.log, relative: a few ulp in fact; the screen widens its bounds by it
RECENT = 8  # accepted values whose median is the level of a steep descent (it lags the descent by ~4 steps)
DESCENT = 0.5  # robust scales of the window the recent level must lie below its median: a descent, not noise
TREND_SPREAD = 2.0  # the window's spread over its step noise from which the spread is the trend's (iid: ~1)
# Differences whose step noise is the noise now: a DPO loss starts at exactly ln 2 (policy = reference) and only grows
# its ±50 % noise as it trains, so the whole window's step noise understates it (a 2.4× step was 9 z, 3.8 against this).
NOISE_NOW = 16


@DETECTORS.register("spike")
class SpikeDetector:
    """Flags steps where ``config.signal`` jumps above its robust recent baseline.

    Example:
        >>> from keel._core import Observation
        >>> det = SpikeDetector(signal="loss")
        >>> for step in range(30):
        ...     _ = det.update(Observation(step=step, values={"loss": 2.0 + 0.01 * (step % 3)}))
        >>> [f.severity for f in det.update(Observation(step=30, values={"loss": 8.0}))]
        ['critical']
    """

    name = "spike"

    def __init__(self, config: SpikeConfig | None = None, *, signal: str | None = None) -> None:
        if signal is not None and not isinstance(signal, str):
            raise TypeError(f"SpikeDetector(signal={signal!r}); allowed: a signal key (a str) or None")
        if config is None:
            signal = signal or keys.LOSS
            grad = "grad" in signal
            config = SpikeConfig(signal=signal, **GRAD_NORM_DEFAULTS) if grad else SpikeConfig(signal=signal)
        config = config_from(self, SpikeConfig, config, {})  # a config of another type: one TypeError here
        if signal is not None and signal != config.signal:
            raise ValueError(f"signal={signal!r} disagrees with config.signal={config.signal!r}")
        self.config = config
        self._log = config.log_scale is not False  # None starts in log space and leaves it at a value <= 0
        # The accepted values, kept sorted as well: the baseline costs a binary search per step, not two sorts.
        self._accepted = RunningMedian(size=config.window, capacity=config.window)
        self._episode: list[float] = []  # transformed values of the current run of spike steps
        self._onset = -1
        self._onset_excess = 0.0
        self._warned = False
        self._critical = False  # the current episode had a critical step
        self._outliers: deque[tuple[int, float]] = deque(maxlen=TAIL_KEPT)  # (step, excess) of isolated outliers
        self._shifted = False  # a level shift was reported and the recent median has not come back down yet
        self._shift_run = 0  # consecutive accepted values at which the recent median was a level shift
        self._shift_onset = -1  # the step the level shift under way began (the oldest step of its first span)
        self._shift_lasted = 0  # accepted values since its warning, each still shifted (-1: its critical was sent)
        self._shift_base = (0.0, 0.0, 0)  # the older values' median, robust scale and count at the warning
        self._accepted_steps: deque[int] = deque(maxlen=max(config.shift_span - 1, 0))  # of the newest accepted values

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not math.isfinite(x):
            return []  # non-finite values are the non-finite detector's; they never enter the baseline
        if x <= 0 and self._log:
            if cfg.log_scale:
                return []
            self._leave_log_space()
        y = math.log(x) if self._log else x
        if len(self._accepted) < cfg.min_history:
            return self._warm_up(obs.step, x, y)
        median, scale = self._baseline(self._accepted.location_scale())
        floor = cfg.scale_floor if self._log else cfg.scale_floor * abs(median) + 1e-12
        z = robust_z(y, median, scale, floor)
        excess = self._excess(y, median)
        if z < cfg.threshold or excess < cfg.min_excess:
            self._end_episode(obs.step)
            shift = self._level_shift(obs.step, x, y)
            self._accept(obs.step, y)
            return shift
        return self._spike(obs.step, x, median, z, excess)

    def _warm_up(self, step: int, x: float, y: float) -> list[Finding]:
        """A step before the baseline exists: judged against the values so far, a spike only ``1 + warmup_excess``
        times their median (and ``threshold`` robust z, their spread inflated by a fast early trend)."""
        cfg = self.config
        if self._log and len(self._accepted) >= cfg.warmup_points:
            median, scale = self._accepted.location_scale()
            z = robust_z(y, median, scale, cfg.scale_floor)
            excess = relative_excess(y - median)
            if z >= cfg.threshold and excess >= max(cfg.min_excess, cfg.warmup_excess):
                return self._spike(step, x, median, z, excess)
        self._end_episode(step)
        self._accept(step, y)
        return []

    def _accept(self, step: int, y: float) -> None:
        self._accepted.push(y)
        self._accepted_steps.append(step)

    def _level_shift(self, step: int, x: float, y: float) -> list[Finding]:
        """Before accepting ``y``: a ``warning`` when the median of it and the ``shift_span`` − 1 values before it lies
        far above the median of the window's older values (disjoint samples: the new level does not hide itself), and
        ``critical`` when it still does ``shift_lasting`` values after that warning."""
        cfg = self.config
        span = cfg.shift_span
        window = self._accepted.values
        older = len(window) - span + 1
        if not self._log or not span or older < span:
            return []
        recent = median_of([*itertools.islice(reversed(window), span - 1), y])  # O(span): from the deque's end
        # the older values' median is at least the window's value of its rank (a subset's i-th least is no less than
        # the whole's): below twice that, no shift, and the older values need no sort (the common case, O(1))
        if not self._shifted and recent - self._accepted.ranked((older - 1) // 2) < math.log1p(cfg.shift_excess):
            self._shift_run = 0
            return []
        median, scale = sorted_location_scale(sorted(itertools.islice(window, older)))
        rise = recent - median
        standard_error, required = self._shift_bar(scale, older)
        if self._shifted:
            self._shifted = rise >= required / 2  # hysteresis: one warning per shift
            return self._lasting(step, x, recent) if self._shifted else []
        self._shift_run = self._shift_run + 1 if rise >= required else 0
        if self._shift_run == 1:  # the shift began with the oldest value of this span
            full = len(self._accepted_steps) == span - 1
            self._shift_onset = self._accepted_steps[0] if full and span > 1 else step
        if self._shift_run < cfg.patience:
            return []
        self._shifted, self._shift_run, self._shift_lasted = True, 0, 0
        self._shift_base = (median, scale, older)
        return [self._shift_finding(step, "warning", x, median, recent, rise / standard_error, older, scale)]

    def _shift_bar(self, scale: float, older: int) -> tuple[float, float]:
        """The standard error of the difference of the recent and the ``older`` values' medians (``scale``: the older
        values' robust scale, log units), and the rise a level shift needs."""
        cfg = self.config
        standard_error = math.hypot(
            *(median_standard_error(max(scale, cfg.scale_floor), n) for n in (cfg.shift_span, older))
        )
        return standard_error, max(math.log1p(cfg.shift_excess), cfg.shift_z * standard_error)

    def _lasting(self, step: int, x: float, recent: float) -> list[Finding]:
        """After the level-shift warning: ``critical`` once the recent median (``recent``) has stayed at least half
        the rise a shift needs above the level before it (frozen at the warning: the window's older values take in
        the new level as it lasts) at ``shift_lasting`` consecutive values."""
        lasting = self.config.shift_lasting
        if not lasting or self._shift_lasted < 0:  # off, or reported already
            return []
        median, scale, older = self._shift_base
        standard_error, required = self._shift_bar(scale, older)
        self._shift_lasted = self._shift_lasted + 1 if recent - median >= required / 2 else 0
        if self._shift_lasted < lasting:
            return []
        self._shift_lasted = -1
        z = (recent - median) / standard_error
        return [self._shift_finding(step, "critical", x, median, recent, z, older, scale)]

    def _shift_finding(
        self, step: int, severity: Severity, x: float, median: float, recent: float, z: float, older: int, scale: float
    ) -> Finding:
        """The level shift's ``warning`` or ``critical``: the median of the recent values, ``recent``, over ``median``,
        the older values' (log units; ``z``: the rise in standard errors, ``scale``: their robust scale)."""
        baseline, level = math.exp(median), math.exp(recent)
        evidence = {
            "z": round(z, 2),
            "ratio": round(level / baseline, 4),
            "level_shift": True,
            "recent_median": level,
            "span": self.config.shift_span,
            "noise": round(relative_excess(scale), 4),
            "onset_step": self._shift_onset,
        }
        if severity == "critical":
            evidence["lasting"] = self.config.shift_lasting
        cause, advice = _explain_shift(self.config, severity, level / baseline, older, scale, self._shift_onset)
        return self._finding(step, severity, x, baseline, evidence, cause, advice)

    def scan(self, steps: np.ndarray, values: np.ndarray) -> list[Finding]:
        """Judge a whole series at once: exactly what `update` gives, step by step, and the same state after.

        See `keel.detect.scan` for the contract. A quiet stretch is screened in bulk (`_spike_screen`): only
        the steps that might be spikes, and the episodes that follow them, go through ``update``.

        Args:
            steps: The observations' steps (integers), one per value.
            values: The signal's values (float64).

        Example:
            >>> det = SpikeDetector(signal="loss")
            >>> values = 2.0 + 0.01 * (np.arange(500) % 3)
            >>> values[300] = 8.0
            >>> [(f.step, f.severity) for f in det.scan(np.arange(500), values)]
            [(300, 'critical')]
        """
        steps, values = as_series(steps, values)
        cfg, found, i, n = self.config, [], 0, len(values)
        chunk = SCAN_CHUNK
        while i < n:
            if self._episode or self._shifted or self._shift_run or len(self._accepted) < cfg.window:
                # warm-up, an episode, a level shift under way: step by step
                found += self._update_at(steps, values, i)
                i += 1
                continue
            stop = min(n, i + chunk)
            x = values[i:stop]
            usable = np.isfinite(x)
            halt = stop  # a value <= 0 ends log space (log_scale=None): ``update`` converts the window there
            if self._log:
                nonpositive = usable & (x <= 0)
                if cfg.log_scale is None and nonpositive.any():
                    halt = i + int(np.argmax(nonpositive))
                    usable[halt - i :] = False
                usable &= ~nonpositive
            at = np.flatnonzero(usable) + i
            ys = np.log(values[at]) if self._log else values[at]  # for the screen; the window takes math.log's
            maybe = possible_spikes(
                np.array(self._accepted.values),
                ys,
                log=self._log,
                error=LOG_ERROR,
                threshold=cfg.threshold,
                min_excess=cfg.min_excess,
                scale_floor=cfg.scale_floor,
                shifts=self._shift_screen(ys),
            )
            if self._log:  # a steep descent is judged against its recent level (`_baseline`): screened apart
                maybe |= possible_descent_spikes(
                    np.array(self._accepted.values),
                    ys,
                    recent=RECENT,
                    error=LOG_ERROR,
                    threshold=cfg.threshold,
                    min_excess=cfg.min_excess,
                    scale_floor=cfg.scale_floor,
                )
            done = 0
            for k in np.flatnonzero(maybe).tolist():
                self._accept_quiet(values[at[done:k]], steps[at[done:k]])
                judged = self._update_at(steps, values, int(at[k]))
                found += judged
                done = k + 1
                if judged or self._episode or self._shift_run:  # the state changed from what the screen assumed
                    halt = stop = int(at[k]) + 1
                    chunk = SCAN_CHUNK
                    break
            else:
                self._accept_quiet(values[at[done:]], steps[at[done:]])
                chunk = min(2 * chunk, SCAN_CHUNK_MAX)
            i = stop
            if halt < stop:
                found += self._update_at(steps, values, halt)
                i = halt + 1
        return found

    def _shift_screen(self, ys: np.ndarray) -> tuple[np.ndarray, int, float] | None:
        """The level-shift test's inputs to `possible_spikes` for the next log-values ``ys`` (each assumed accepted,
        the window full), or None where `_level_shift` never runs."""
        cfg = self.config
        span, size = cfg.shift_span, len(self._accepted.values)
        older = size - span + 1
        if not self._log or not span or older < span:
            return None
        tail = np.fromiter(itertools.islice(self._accepted.values, older, None), np.float64, span - 1)
        return rolling_median(np.concatenate([tail, ys]), span), (older - 1) // 2, math.log1p(cfg.shift_excess)

    def critical_above(self, step: int) -> float:
        """The smallest value `update` would judge ``critical`` at ``step``, given the state now (inf: none).

        A device can compare the next value with it and skip a critical spike without reading the value first
        (`keel.recover.gate`): every condition of a critical step — robust z, excess, beyond the run's own tail
        of outliers — rises with the value, so their thresholds combine into one. Equal to `update`'s verdict up
        to rounding at the threshold itself.

        Example:
            >>> det = SpikeDetector(signal="loss")
            >>> for s in range(30):
            ...     _ = det.update(Observation(step=s, values={"loss": 2.0 + 0.01 * (s % 3)}))
            >>> limit = det.critical_above(30)
            >>> [f.severity for f in det.scan(np.array([30]), np.array([limit * 1.001]))]
            ['critical']
        """
        cfg = self.config
        if len(self._episode) + 1 >= cfg.rebase_after:
            return math.inf  # the next spike step rebases (info)
        tail = max((e for at, e in self._outliers if step - at <= TAIL_SPAN), default=0.0)
        z_needed, excess_needed = max(cfg.threshold, cfg.critical_z), max(cfg.min_excess, cfg.critical_excess)
        if len(self._accepted) < cfg.min_history:
            if not self._log or len(self._accepted) < cfg.warmup_points:
                return math.inf  # warming up: nothing is flagged yet
            median, scale = self._accepted.location_scale()  # `_warm_up`: the values so far, a larger excess
            excess_needed = max(excess_needed, cfg.warmup_excess)
        else:
            median, scale = self._baseline(self._accepted.location_scale())
        if self._log:
            rise = max(
                z_needed * max(scale, cfg.scale_floor), math.log1p(excess_needed), cfg.tail_factor * math.log1p(tail)
            )
            return math.exp(median + rise) if median + rise < 709.0 else math.inf
        unit = abs(median) + 1e-12
        rise = max(
            z_needed * max(scale, cfg.scale_floor * abs(median) + 1e-12),
            excess_needed * unit,
            math.expm1(cfg.tail_factor * math.log1p(tail)) * unit,
        )
        return median + rise

    def _baseline(self, plain: tuple[float, float]) -> tuple[float, float]:
        """The (location, scale) a value is judged against: the window's median and MAD (``plain``), or during a steep
        descent (log space) the median of its last ``RECENT`` values and its step noise — or that of its last
        ``NOISE_NOW`` differences where larger (noise that grew as the run went on)."""
        median, scale = plain
        if not self._log:
            return median, scale
        window = list(self._accepted.values)  # oldest first
        recent = median_of(window[-RECENT:])
        # the window's median, or its older half's: a fast fall and then a plateau (the run's first steps) leaves
        # the median on the plateau, but its older half in the fall — whose spread still hides a spike on the plateau
        # (h28 Y, L2: a real Lightning run's loss x23 at step 61, after a fall of 5 -> 0.1 in 20 steps: no finding)
        above = max(median, median_of(window[: len(window) // 2])) if len(window) >= 2 * RECENT else median
        if above - recent < DESCENT * scale:
            return median, scale
        differences = [b - a for a, b in zip(window, window[1:], strict=False)]
        noise = step_noise(differences)
        if not scale >= TREND_SPREAD * noise:  # (NaN: one value, no difference to measure noise by)
            return median, scale
        return recent, max(noise, step_noise(differences[-NOISE_NOW:]))

    def _update_at(self, steps: np.ndarray, values: np.ndarray, i: int) -> list[Finding]:
        x = float(values[i])
        return self.update(Observation(step=int(steps[i]), values={self.config.signal: x})) if x == x else []

    def _accept_quiet(self, xs: np.ndarray, steps: np.ndarray) -> None:
        """What ``update`` does on a run of quiet steps with values ``xs`` (finite, and positive in log space)."""
        if len(xs):
            self._end_episode(int(steps.max()))  # the trims of each step, at once: they only depend on the latest
            kept = xs[-self.config.window :].tolist()  # the window keeps no more than that
            self._accepted.extend(map(math.log, kept) if self._log else kept)
            if self._accepted_steps.maxlen:
                self._accepted_steps.extend(steps[-self._accepted_steps.maxlen :].tolist())

    def _leave_log_space(self) -> None:
        """A value <= 0 arrived under ``log_scale=None``: keep the history, in linear units, from now on."""
        self._log = self._shifted = False  # (the level-shift test is for log space)
        self._shift_run = 0
        self._accepted = self._window(math.exp(v) for v in self._accepted.values)
        self._episode = [math.exp(v) for v in self._episode]

    def _spike(self, step: int, x: float, median: float, z: float, excess: float) -> list[Finding]:
        cfg = self.config
        if not self._episode:
            self._onset, self._onset_excess, self._warned, self._critical = step, excess, False, False
        self._episode.append(math.log(x) if self._log else x)
        run = len(self._episode)
        baseline = math.exp(median) if self._log else median
        ratio = x / baseline if baseline else math.inf  # a baseline of exactly 0 (a linear loss sitting at 0)
        warm_up = len(self._accepted) < cfg.min_history  # judged against the highest value so far (`_warm_up`)
        evidence: dict[str, Any] = {
            "z": round(z, 2) if math.isfinite(z) else None,
            "ratio": round(ratio, 4) if baseline else None,
            "onset_step": self._onset,
            "consecutive": run,
        }
        if warm_up:
            evidence["warm_up"] = len(self._accepted)
        if run >= cfg.rebase_after:
            # The new level has lasted: accept it as the baseline and close the episode.
            self._accepted = self._window(self._episode[-cfg.min_history :])
            self._accepted_steps.clear()  # (the episode's steps are not kept: a shift from here is dated by its step)
            self._end_episode(step)
            evidence["rebased"] = True
            return [
                self._finding(
                    step,
                    "info",
                    x,
                    baseline,
                    evidence,
                    f"{cfg.signal} has stayed at a new level for {run} steps; it is the new baseline.",
                    "None: this is a lasting change, not a spike. Check the divergence findings.",
                )
            ]
        tail = max((e for at, e in self._outliers if step - at <= TAIL_SPAN), default=0.0)
        if tail:
            evidence["largest_recent_outlier_ratio"] = round(1 + tail, 4)
        beyond_tail = math.log1p(excess) >= cfg.tail_factor * math.log1p(tail)
        if z >= cfg.critical_z and excess >= cfg.critical_excess and beyond_tail:
            severity: Severity = "critical"
            self._critical = True
        elif run >= cfg.patience and not self._warned and self._sustained(median) >= cfg.warn_excess:
            severity, self._warned = "warning", True
        elif run == 1:
            severity = "info"
        else:
            return []
        seen = len(self._accepted) if warm_up else 0
        signed = None if baseline > 0 and x > 0 else (x, baseline)  # a ratio says nothing of a loss of either sign
        explained = _explain(cfg, severity, ratio, run, seen, signed)
        return [self._finding(step, severity, x, baseline, evidence, *explained)]

    def _sustained(self, median: float) -> float:
        """The relative excess over ``median`` (the baseline, which no spike step moves) of the median of the
        episode's last ``patience`` steps."""
        return self._excess(median_of(self._episode[-self.config.patience :]), median)

    def _excess(self, y: float, median: float) -> float:
        """How far ``y`` lies above ``median`` as a fraction of it (``y`` and ``median`` in the detector's space)."""
        return relative_excess(y - median) if self._log else (y - median) / (abs(median) + 1e-12)

    def _window(self, values: Iterable[float]) -> RunningMedian:
        return RunningMedian(size=self.config.window, capacity=self.config.window, values=values)

    def _finding(
        self,
        step: int,
        severity: Severity,
        x: float,
        baseline: float,
        evidence: dict[str, Any],
        cause: str,
        advice: str,
    ) -> Finding:
        return Finding(
            step=step,
            kind=self.config.kind,
            severity=severity,
            signal=self.config.signal,
            value=x,
            baseline=baseline,
            evidence=evidence,
            cause=cause,
            advice=advice,
        )

    def _end_episode(self, step: int) -> None:
        if len(self._episode) == 1 and not self._critical:  # an outlier the run shrugged off: its own tail
            self._outliers.append((self._onset, self._onset_excess))
        while self._outliers and step - self._outliers[0][0] > TAIL_SPAN:
            self._outliers.popleft()
        self._episode = []
        self._onset = -1
        self._warned = self._critical = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "accepted": list(self._accepted.values),
            "episode": list(self._episode),
            "onset": self._onset,
            "warned": self._warned,
            "log": self._log,
            "onset_excess": self._onset_excess,
            "critical": self._critical,
            "outliers": [list(o) for o in self._outliers],
            "shifted": self._shifted,
            "shift_run": self._shift_run,
            "shift_onset": self._shift_onset,
            "shift_lasted": self._shift_lasted,
            "shift_base": list(self._shift_base),
            "accepted_steps": list(self._accepted_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = SpikeConfig(**state["config"])
        self._accepted = self._window(state["accepted"])
        self._episode = list(state["episode"])
        self._onset, self._warned = int(state["onset"]), bool(state["warned"])
        self._log = bool(state.get("log", self.config.log_scale is not False))
        self._onset_excess = float(state.get("onset_excess", 0.0))
        self._critical = bool(state.get("critical", False))
        self._outliers = deque(((int(a), float(e)) for a, e in state.get("outliers", ())), maxlen=TAIL_KEPT)
        self._shifted = bool(state.get("shifted", False))
        self._shift_run = int(state.get("shift_run", 0))
        self._shift_onset = int(state.get("shift_onset", -1))
        self._shift_lasted = int(state.get("shift_lasted", 0))
        median, scale, older = state.get("shift_base", (0.0, 0.0, 0))
        self._shift_base = (float(median), float(scale), int(older))
        steps = state.get("accepted_steps", ())
        self._accepted_steps = deque(map(int, steps), maxlen=max(self.config.shift_span - 1, 0))


def _explain_shift(
    cfg: SpikeConfig, severity: Severity, ratio: float, older: int, scale: float, onset: int
) -> tuple[str, str]:
    """Cause and advice for a level shift that began at step ``onset`` (``scale``: the older values' robust scale, log
    units); ``critical``: it has lasted ``shift_lasting`` values past its warning."""
    what = "loss" if cfg.signal == keys.LOSS else cfg.signal
    noise = f"each step is within the run's noise (±{relative_excess(scale):.0%} per step), the level is not"
    if severity != "critical":
        cause = (
            f"The median {what} of the last {cfg.shift_span} steps is {ratio:.3g}× its median over the {older} before "
            f"them: {noise} — the model, not one batch, changed (an update that overshot, an LR jump)."
        )
        return cause, _explain(cfg, "warning", ratio, cfg.shift_span)[1]
    cause = (
        f"The median {what} of the last {cfg.shift_span} steps is still {ratio:.3g}× its level before the shift began "
        f"(step {onset}), {cfg.shift_lasting} steps past the level-shift warning: {noise}. The damage is in the "
        "weights, which no skipped update mends — or the data changed for good (a new task or curriculum stage)."
    )
    advice = (
        f"Roll back to a snapshot from before step {onset} (policy='recover'; once: a shift that comes back after "
        "the rollback is the data, and the run carries on). If it recurs, lower the learning rate or lengthen warm-up."
    )
    return cause, advice


def _explain(
    cfg: SpikeConfig,
    severity: Severity,
    ratio: float,
    run: int,
    seen: int = 0,
    signed: tuple[float, float] | None = None,
) -> tuple[str, str]:
    """Cause and advice for a spike finding (``seen``: the values before it, in the first steps; 0 after them;
    ``signed``: the value and its baseline where one is not positive — a policy-gradient loss near 0 of either sign —,
    said as values: "-101× its recent median" said nothing (helper Y's L1, verl's pg_loss))."""
    what = "loss" if cfg.signal == keys.LOSS else cfg.signal
    against = f"the median of its first {seen} values" if seen else "its recent median"
    size = f"{ratio:.3g}× {against}" if signed is None else f"{signed[0]:.4g} ({against}: {signed[1]:.4g})"
    if severity == "critical":
        cause = (
            f"The {what} jumped to {size} in one step: the update computed from "
            "this batch is likely harmful (a corrupt or extreme batch, or the optimizer overshooting)."
        )
        if seen:
            cause += " This early in a run, a learning rate far too high is the usual cause."
        advice = (
            "Skip this update (policy='skip'; OLMo-core SkipStepOptimizer, metaseq skip_spike). If such "
            "spikes recur, clip gradients or use spike-aware clipping (Stable-SPAM AdaClip, Huang et al. "
            "2025) and lower the learning rate."
        )
    elif severity == "warning":
        stayed = f"at {size}" if signed else f"{ratio:.3g}× above {against}"
        cause = (
            f"The {what} has stayed {stayed} for {run} steps: the model, not "
            "one batch, changed — or the data did (a corpus read in order, a new data source or task)."
        )
        advice = (
            "Lower the learning rate or lengthen warm-up; check attention and output logits (QK-norm, "
            "Dehghani et al. 2023; z-loss, Chowdhery et al. 2022). policy='recover' rolls back past the "
            "window (PaLM restarted ~100 steps earlier and skipped 200–500 batches). If the loss follows the "
            "data being read (unshuffled data), this is the data: nothing to change."
        )
    else:
        cause = f"One step's {what} was {size}: most likely an outlier batch."
        advice = (
            "Nothing for an isolated outlier. If they recur, inspect the batches at these steps "
            "(Chowdhery et al. 2022 found spikes tied to specific batches)."
        )
    return cause, advice
