"""The spike and divergence detectors as they were before their fast paths: the oracle of the equivalence tests.

Frozen copies of `SpikeDetector` and `DivergenceDetector` (commit 862248f), with every statistic computed the
straightforward way — the window sorted on every step, the MAD by sorting the deviations, the noise by sorting
its 256 differences — so the fast online ``update`` and the batch ``scan`` are checked against an algorithm
that shares none of their data structures. Five changes, all fixes made together with the fast paths (a
hostile log or setting made the originals raise or hang): ``exp(x) − 1`` that overflows is ∞, a log-ratio
whose quotient underflows is a difference of logs, a spike over a baseline of exactly 0 has the ratio ∞ in its
text (it divided by zero), a noise so large that the window it needs overflows asks for the widest window, and
the divergence window ladder grows from a ``short`` under 4 (it looped forever). Later, a spike's evidence writes a
robust z that overflows (a value 10^300 over a linear median of 10^-300) as None, not ∞, as the detector does.
Cause and advice texts are the detectors' own (only the numbers in them are checked here).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict
from typing import Any

from keel._core.finding import Finding
from keel._core.observation import Observation
from keel.detect.divergence import NOISE_EVERY, NOISE_SPAN, WINDOW_GROWTH, DivergenceConfig
from keel.detect.spike import (
    DESCENT,
    GRAD_NORM_DEFAULTS,
    NOISE_NOW,
    RECENT,
    TAIL_KEPT,
    TAIL_SPAN,
    TREND_SPREAD,
    SpikeConfig,
    _explain,
    _explain_shift,
)

MAD_TO_STD = 1.4826
MEDIAN_SE = math.sqrt(math.pi / 2)


def median(values):
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def robust_location_scale(values):
    if len(values) == 0:
        return float("nan"), float("nan")
    location = median(values)
    return location, median([abs(v - location) for v in values]) * MAD_TO_STD


def step_noise(differences):
    return median(map(abs, differences)) * MAD_TO_STD / math.sqrt(2)


def median_standard_error(scale, n):
    return MEDIAN_SE * scale / math.sqrt(n)


def expm1(x):
    try:
        return math.expm1(x)
    except OverflowError:
        return math.inf


class ReferenceSpike:
    name = "spike"

    def __init__(self, config=None, *, signal=None):
        if config is None:
            signal = signal or "loss"
            config = SpikeConfig(signal=signal, **(GRAD_NORM_DEFAULTS if "grad" in signal else {}))
        self.config = config
        self._log = config.log_scale is not False
        self._accepted = deque(maxlen=config.window)
        self._episode = []
        self._onset = -1
        self._onset_excess = 0.0
        self._warned = False
        self._critical = False
        self._outliers = deque(maxlen=TAIL_KEPT)
        self._shifted = False
        self._shift_run = 0
        self._shift_onset = -1
        self._shift_lasted = 0
        self._shift_base = (0.0, 0.0, 0)
        self._steps = []  # the step of each accepted value (the level shift's onset is the oldest of its span)

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not math.isfinite(x):
            return []
        if x <= 0 and self._log:
            if cfg.log_scale:
                return []
            self._log = self._shifted = False
            self._shift_run = 0
            self._accepted = deque((math.exp(v) for v in self._accepted), maxlen=cfg.window)
            self._episode = [math.exp(v) for v in self._episode]
        y = math.log(x) if self._log else x
        if len(self._accepted) < cfg.min_history:  # warm-up: log space, from warmup_points values, a larger excess
            if self._log and len(self._accepted) >= cfg.warmup_points:
                med, scale = robust_location_scale(self._accepted)
                z = (y - med) / max(scale, cfg.scale_floor)
                excess = expm1(y - med)
                if z >= cfg.threshold and excess >= max(cfg.min_excess, cfg.warmup_excess):
                    return self._spike(obs.step, x, med, z, excess)
            self._end_episode(obs.step)
            self._accept(obs.step, y)
            return []
        med, scale = robust_location_scale(self._accepted)
        if self._log:  # a steep descent: its recent level and step noise (keel.detect.spike._baseline)
            recent = median(list(self._accepted)[-RECENT:])
            window = list(self._accepted)
            differences = [b - a for a, b in zip(window, window[1:], strict=False)]
            noise = step_noise(differences)
            # the window's median, or its older half's (a fall that the plateau after it outnumbers)
            older = median(window[: len(window) // 2]) if len(window) >= 2 * RECENT else med
            if max(med, older) - recent >= DESCENT * scale and scale >= TREND_SPREAD * noise:
                med, scale = recent, max(noise, step_noise(differences[-NOISE_NOW:]))
        floor = cfg.scale_floor if self._log else cfg.scale_floor * abs(med) + 1e-12
        z = (y - med) / max(scale, floor)
        excess = expm1(y - med) if self._log else (y - med) / (abs(med) + 1e-12)
        if z < cfg.threshold or excess < cfg.min_excess:
            self._end_episode(obs.step)
            found = self._level_shift(obs.step, x, y)
            self._accept(obs.step, y)
            return found
        return self._spike(obs.step, x, med, z, excess)

    def _accept(self, step, y):
        self._accepted.append(y)
        self._steps.append(step)

    def _bar(self, scale, older):  # the standard error of the two medians' difference, the rise a shift needs
        cfg = self.config
        se = math.hypot(*(median_standard_error(max(scale, cfg.scale_floor), n) for n in (cfg.shift_span, older)))
        return se, max(math.log1p(cfg.shift_excess), cfg.shift_z * se)

    def _level_shift(self, step, x, y):  # median of the last shift_span values vs the window's older values
        cfg = self.config
        window = list(self._accepted)
        older = len(window) - cfg.shift_span + 1
        if not self._log or not cfg.shift_span or older < cfg.shift_span:
            return []
        recent = median(window[older:] + [y])
        med, scale = robust_location_scale(window[:older])
        rise = recent - med
        se, required = self._bar(scale, older)
        if self._shifted:
            self._shifted = rise >= required / 2
            if not self._shifted or not cfg.shift_lasting or self._shift_lasted < 0:
                return []
            # lasting: the recent median against the level before the shift, as it was at the warning
            base, base_scale, base_older = self._shift_base
            base_se, base_required = self._bar(base_scale, base_older)
            self._shift_lasted = self._shift_lasted + 1 if recent - base >= base_required / 2 else 0
            if self._shift_lasted < cfg.shift_lasting:
                return []
            self._shift_lasted = -1
            return [
                self._shift_finding(
                    step, "critical", x, base, recent, (recent - base) / base_se, base_older, base_scale
                )
            ]
        self._shift_run = self._shift_run + 1 if rise >= required else 0
        if self._shift_run == 1:  # the oldest step of this span; a span reaching before a rebase: this step
            span_steps = self._steps[-(cfg.shift_span - 1) :] if cfg.shift_span > 1 else []
            self._shift_onset = span_steps[0] if len(span_steps) == cfg.shift_span - 1 and span_steps else step
        if self._shift_run < cfg.patience:
            return []
        self._shifted, self._shift_run, self._shift_lasted = True, 0, 0
        self._shift_base = (med, scale, older)
        return [self._shift_finding(step, "warning", x, med, recent, rise / se, older, scale)]

    def _shift_finding(self, step, severity, x, med, recent, z, older, scale):
        cfg = self.config
        baseline, level = math.exp(med), math.exp(recent)
        evidence = {
            "z": round(z, 2),
            "ratio": round(level / baseline, 4),
            "level_shift": True,
            "recent_median": level,
            "span": cfg.shift_span,
            "noise": round(expm1(scale), 4),
            "onset_step": self._shift_onset,
        }
        if severity == "critical":
            evidence["lasting"] = cfg.shift_lasting
        cause, advice = _explain_shift(cfg, severity, level / baseline, older, scale, self._shift_onset)
        return self._finding(step, severity, x, baseline, evidence, cause, advice)

    def _sustained(self, med):  # the excess of the median of the episode's last ``patience`` steps
        typical = median(self._episode[-self.config.patience :])
        return expm1(typical - med) if self._log else (typical - med) / (abs(med) + 1e-12)

    def _spike(self, step, x, med, z, excess):
        cfg = self.config
        if not self._episode:
            self._onset, self._onset_excess, self._warned, self._critical = step, excess, False, False
        self._episode.append(math.log(x) if self._log else x)
        run = len(self._episode)
        baseline = math.exp(med) if self._log else med
        ratio = x / baseline if baseline else math.inf  # a baseline of exactly 0 (a linear loss sitting at 0)
        seen = len(self._accepted) if len(self._accepted) < cfg.min_history else 0
        evidence = {
            "z": round(z, 2) if math.isfinite(z) else None,
            "ratio": round(ratio, 4) if baseline else None,
            "onset_step": self._onset,
            "consecutive": run,
        }
        if seen:
            evidence["warm_up"] = seen
        if run >= cfg.rebase_after:
            self._accepted.clear()
            self._accepted.extend(self._episode[-cfg.min_history :])
            self._steps = []  # the episode's steps are not known to the window
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
            severity = "critical"
            self._critical = True
        elif run >= cfg.patience and not self._warned and self._sustained(med) >= cfg.warn_excess:
            severity, self._warned = "warning", True
        elif run == 1:
            severity = "info"
        else:
            return []
        signed = (x, baseline) if baseline <= 0 or x <= 0 else None  # said as values: no ratio of either sign
        cause, advice = _explain(cfg, severity, ratio, run, seen, signed)
        return [self._finding(step, severity, x, baseline, evidence, cause, advice)]

    def _finding(self, step, severity, x, baseline, evidence, cause, advice):
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

    def _end_episode(self, step):
        if len(self._episode) == 1 and not self._critical:
            self._outliers.append((self._onset, self._onset_excess))
        while self._outliers and step - self._outliers[0][0] > TAIL_SPAN:
            self._outliers.popleft()
        self._episode = []
        self._onset = -1
        self._warned = self._critical = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "accepted": list(self._accepted),
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
            "accepted_steps": self._steps[-(self.config.shift_span - 1) :] if self.config.shift_span > 1 else [],
        }


class ReferenceDivergence:
    name = "divergence"

    def __init__(self, config=None):
        self.config = config or DivergenceConfig()
        self._values = deque(maxlen=self.config.window)
        self._size = self.config.short
        self._diffs = deque(maxlen=NOISE_SPAN)
        self._noise = math.nan
        self._seen = 0
        self._best = math.inf
        self._best_step = -1
        self._best_se = 0.0
        self._first = []  # the run's first `short` values: where it began
        self._run = 0  # consecutive steps past the threshold
        self._pending = False  # a rise is open: past the threshold, not yet back below its half
        self._reported = None

    def _median(self, size):
        return median(list(self._values)[-size:])

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not math.isfinite(x):
            return []
        if self._values and not self._pending:
            self._diffs.append(_relative_change(self._values[-1], x))
        self._values.append(x)
        self._seen += 1
        if len(self._first) < cfg.short:
            self._first.append(x)
        if len(self._diffs) >= cfg.short and (self._seen % NOISE_EVERY == 0 or math.isnan(self._noise)):
            self._noise = step_noise(self._diffs)
            self._resize(self._window_for(self._noise))
        n = min(len(self._values), self._size)
        if n < cfg.short or math.isnan(self._noise):
            return []
        window = list(self._values)[-self._size :]
        if min(window) < 0 < max(window):  # both signs in the window: a surrogate loss, not judged
            self._run, self._pending, self._reported = 0, False, None
            return []
        med = self._median(self._size)
        se, required, fast_required = self._margins(n)
        if n == self._size and med + se < self._best + self._best_se:
            self._best, self._best_step, self._best_se = med, obs.step, se
            se, required, fast_required = self._margins(n)
        rise = _rise(med, self._best)
        if n > cfg.short:
            fast = self._median(cfg.short)
            fast_rise = _rise(fast, self._best)
            if fast_rise - fast_required > rise - required:
                med, rise, required, n = fast, fast_rise, fast_required, cfg.short
        if self._seen < cfg.min_history or rise < required:
            self._run = 0
            if rise < required / 2:
                self._pending, self._reported = False, None
            return []
        self._pending = True
        self._run += 1
        if self._run < cfg.patience:
            return []
        start = median(self._first)
        fell = _rise(start, self._best)  # from the start (a median of `short`) to the best: past the short margin
        back_at_start = fell >= fast_required and rise >= fell
        severity = "critical" if rise >= math.log1p(cfg.critical_excess) or back_at_start else "warning"
        if self._reported == severity or self._reported == "critical":
            return []
        self._reported = severity
        excess = (med - self._best) / (abs(self._best) + 1e-12)
        evidence = {
            "median": round(med, 6),
            "best": round(self._best, 6),
            "best_step": self._best_step,
            "excess": round(excess, 4),
            "onset_step": obs.step - self._run + 1,
            "window": n,
            "noise": round(self._noise, 4),
            "required_excess": round(expm1(required), 4),
            **({"start": round(start, 6)} if back_at_start and rise < math.log1p(cfg.critical_excess) else {}),
        }
        noisy = (
            f" (the loss swings ±{expm1(self._noise):.0%} per step; the median of {n} steps is judged against that)"
            if min(len(self._values), self._size) > cfg.short
            else ""
        )
        cause = (
            f"The loss's running median has stayed {1 + excess:.3g}× its best level (step "
            f"{self._best_step}) for {self._run} steps{noisy}"
            + (
                f", back at the level of the run's first {cfg.short} steps ({start:.4g}): what it had learned is lost"
                if back_at_start and rise < math.log1p(cfg.critical_excess)
                else ""
            )
            + ": training is diverging, not spiking."
        )
        advice = (
            "Roll back to a snapshot before the onset and continue with a lower learning rate "
            "(policy='recover'; PaLM and OPT-175B restarted earlier with a lower LR); check attention "
            "logits and consider QK-norm and z-loss (Wortsman et al. 2023)."
        )
        return [
            Finding(
                step=obs.step,
                kind="divergence",
                severity=severity,
                signal=cfg.signal,
                value=med,
                baseline=self._best,
                evidence=evidence,
                cause=cause,
                advice=advice,
            )
        ]

    def _resize(self, size):
        if size == self._size:
            return
        before = self._median(self._size)
        self._size = size
        after = self._median(size)
        if math.isfinite(self._best) and after > before:
            self._best += after - before if self._best <= 0 or before <= 0 else self._best * (after / before - 1)

    def _margins(self, n):
        cfg = self.config
        se = median_standard_error(self._noise, n)
        warn = math.log1p(cfg.warn_excess)
        required = max(warn, cfg.noise_margin * math.hypot(se, self._best_se))
        fast = max(warn, cfg.noise_margin * math.hypot(median_standard_error(self._noise, cfg.short), self._best_se))
        return se, required, fast

    def _window_for(self, noise):
        cfg = self.config
        target = math.log1p(cfg.warn_excess) / (cfg.noise_margin * math.sqrt(2))
        try:
            needed = (median_standard_error(noise, 1) / target) ** 2
        except OverflowError:
            needed = math.inf
        n = cfg.short
        while n < needed and n < cfg.window:
            n = min(max(int(n * WINDOW_GROWTH), n + 1) | 1, cfg.window)
        return n

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "recent": list(self._values),
            "size": self._size,
            "diffs": list(self._diffs),
            "noise": self._noise,
            "seen": self._seen,
            "best": self._best,
            "best_step": self._best_step,
            "best_se": self._best_se,
            "start": median(self._first) if len(self._first) == self.config.short else math.nan,
            "run": self._run,
            "pending": self._pending,
            "reported": self._reported,
        }


def _relative_change(before, after):
    if before > 0 and after > 0:
        return _log_ratio(after, before)
    return (after - before) / max(abs(before), 1e-12)


def _rise(med, best):
    if med > 0 and 0 < best < math.inf:
        return _log_ratio(med, best)
    return _relative_change(best, med) if math.isfinite(best) else -math.inf


def _log_ratio(a, b):
    ratio = a / b
    return math.log(ratio) if ratio > 0 else math.log(a) - math.log(b)
