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

A rise is ``critical`` at twice the best level, or earlier once the median is back at the level of the run's first
``short`` steps — everything the run had learned is gone — when the fall from there to the best was itself a real
one (``warn_excess`` and ``noise_margin`` standard errors of the difference between that median of ``short`` values
and the best). keel's own overhead benchmark loop (a byte-level proxy at a constant AdamW LR of 1e-3, unclipped) fell
from 5.6 to 2.9 and climbed back to 5.7–6.4, above the uniform-guess loss ln 256, and was only ever a warning: 2× its
best was never held by the wide median its noise asked for.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._change import moved_best, relative_change, rise
from keel.detect._divergence_scan import Chunk, Stretch, certain_length, critical_rise, prepare
from keel.detect._episode import Episode
from keel.detect._running_median import RunningMedian
from keel.detect.detector import DETECTORS
from keel.detect.robust import median as _median
from keel.detect.robust import median_standard_error, relative_excess, step_noise_of
from keel.detect.scan import SCAN_CHUNK, SCAN_CHUNK_MAX, as_series

NOISE_SPAN = 256  # step-to-step differences behind the noise estimate
NOISE_EVERY = 16  # steps between noise re-estimates (the window follows, and a window resize sorts it)
WINDOW_GROWTH = 1.25  # window sizes form a ladder short, ×1.25, ×1.25², …: re-sorting a window is rare
GALLOP = 64  # steps `scan` looks ahead after one that `update` took (doubling while every step is certain)


@dataclass(kw_only=True)
class DivergenceConfig:
    """Settings of the divergence detector.

    Attributes:
        signal: The signal key watched (a loss: lower is better).
        short: Fewest values in the rolling median: a quiet run's window.
        window: Most values in the rolling median: a noisy run's window (its detection delay is about half).
        min_history: Steps before anything is flagged (the loss falls fast early on). 20, as many as the spike
            detector's baseline needs: the best level is a median over the window the measured noise asks for, so a
            fast early fall sets no lucky best, and iid noise around 2,400 healthy run starts (a 2-20x fall with
            time constant 5-40 steps, Gaussian or t3 noise of 2-30 %) raised nothing at 20 either. At 50 an LR x100
            for one update 20-30 steps into a minGPT-shaped run (the loss 1.4-1.7x its level for 8-12 steps, each
            about 4 step-noise z: no spike) was back down before the detector could say anything.
        warn_excess: Relative rise over the best median that counts (0.25 = 25 % above the best).
        critical_excess: Relative rise that makes the finding critical (1.0 = twice the best); a rise back to the
            level of the run's first ``short`` steps is critical too, when the fall from there was a real one.
        patience: Consecutive steps above the threshold before a finding.
        noise_margin: Standard errors of the difference between the current and the best median a rise must
            also exceed; the window grows until ``warn_excess`` is that many standard errors.
    """

    signal: str = keys.LOSS
    short: int = 9
    window: int = 255
    min_history: int = 20
    warn_excess: float = 0.25
    critical_excess: float = 1.0
    patience: int = 10
    noise_margin: float = 5.5

    def __post_init__(self) -> None:
        check_types(self)
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
        self.config = config_from(self, DivergenceConfig, config, {})
        self._level = RunningMedian(size=self.config.short, capacity=self.config.window)
        self._diffs: deque[float] = deque(maxlen=NOISE_SPAN)
        self._spread = RunningMedian(size=NOISE_SPAN, capacity=NOISE_SPAN)  # abs(diffs), kept sorted for the noise
        self._noise = math.nan  # step-to-step noise, log units (relative units for a non-positive loss)
        self._seen = 0
        self._best = math.inf
        self._best_step = -1
        self._best_se = 0.0  # the best median's standard error when it was measured
        self._start = math.nan  # the median of the first `short` finite values: where the run began
        # run: consecutive steps past the threshold; a finding dates the onset from it (step - run + 1)
        self._episode = Episode(keys=("run", "reported"))
        self._pending = False  # a rise is open: past the threshold, not yet back below its half
        self._margin_key: tuple[Any, ...] = ()
        self._margin_config: DivergenceConfig | None = None
        self._margin = (0.0, 0.0, 0.0)

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not math.isfinite(x):
            return []
        if self._level.values and not self._pending:  # a pending rise must not widen its own margin
            diff = relative_change(self._level.values[-1], x)
            self._diffs.append(diff)
            self._spread.push(abs(diff))
        self._level.push(x)
        self._seen += 1
        if self._seen == cfg.short:  # the window holds exactly the first `short` values (no resize before the noise)
            self._start = self._level.median()
        if len(self._diffs) >= cfg.short and (self._seen % NOISE_EVERY == 0 or math.isnan(self._noise)):
            self._noise = step_noise_of(self._spread.median())  # robust.step_noise(self._diffs), without a sort
            self._resize(self._window_for(self._noise))
        n = len(self._level)
        if n < cfg.short or math.isnan(self._noise):
            return []  # no best before the noise is known: an early median of a noisy run is a lucky one
        if self._level.ranked(0) < 0 < self._level.ranked(n - 1):
            # a loss of both signs within the window is a surrogate near 0 either way (a policy gradient's
            # -log_prob * return, an adversarial loss), no measure of fit: no best level and no rise to judge (a
            # healthy REINFORCE run was rolled back three times, then aborted, as its episodes lengthened)
            self._episode.break_run()
            self._pending = False
            self._episode.close()
            return []
        median = self._level.median()
        se, required, fast_required = self._margins(n)
        # The best is a median over the full window the noise asks for, and a more precise one wins a near tie
        # (lower by one standard error): the lowest of many imprecise medians is luck, not a level reached.
        if n == self._level.size and median + se < self._best + self._best_se:
            self._best, self._best_step, self._best_se = median, obs.step, se
            se, required, fast_required = self._margins(n)
        # Two views of the current level: the noise's window, and the last ``short`` steps, whose larger margin
        # a steep rise clears long before the wide median moves (a blow-up is not made to wait for it).
        up = rise(median, self._best)
        if n > cfg.short:
            fast = _median(itertools.islice(reversed(self._level.values), cfg.short))  # 9 values: a sort is cheap
            fast_up = rise(fast, self._best)
            if fast_up - fast_required > up - required:  # judge by the view furthest past its threshold
                median, up, required, n = fast, fast_up, fast_required, cfg.short
        if self._seen < cfg.min_history or up < required:
            self._episode.break_run()  # patience counts consecutive steps past the threshold
            if up < required / 2:  # hysteresis: the episode ends once the loss is back down
                self._pending = False
                self._episode.close()
            return []
        self._pending = True
        self._episode.run += 1
        run = self._episode.run
        if run < cfg.patience:
            return []
        # the fall from the start (a median of `short` values, as the fast view's) must clear the fast view's margin
        severity = self._episode.escalate(critical=up >= self._critical_rise(fast_required), warning=True)
        if severity is None:
            return []
        back_at_start = up < math.log1p(cfg.critical_excess) and severity == "critical"
        excess = (median - self._best) / (abs(self._best) + 1e-12)
        evidence = {
            "median": round(median, 6),
            "best": round(self._best, 6),
            "best_step": self._best_step,
            "excess": round(excess, 4),
            "onset_step": obs.step - run + 1,
            "window": n,
            "noise": round(self._noise, 4),
            "required_excess": round(relative_excess(required), 4),
            **({"start": round(self._start, 6)} if back_at_start else {}),
        }
        noisy = (
            f" (the loss swings ±{relative_excess(self._noise):.0%} per step; the median of {n} steps is judged "
            f"against that)"
            if len(self._level) > cfg.short
            else ""
        )
        start = (
            f", back at the level of the run's first {cfg.short} steps ({self._start:.4g}): what it had learned is lost"
            if back_at_start
            else ""
        )
        cause = (
            f"The loss's running median has stayed {1 + excess:.3g}× its best level (step "
            f"{self._best_step}) for {run} steps{noisy}{start}: training is diverging, not spiking."
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
                value=median,
                baseline=self._best,
                evidence=evidence,
                cause=cause,
                advice=advice,
            )
        ]

    def _critical_rise(self, fall_required: float) -> float:
        """The rise that is critical: ``critical_excess``, or less where it brings the loss back to its start."""
        return critical_rise(self.config, self._start, self._best, fall_required)

    def scan(self, steps: np.ndarray, values: np.ndarray) -> list[Finding]:
        """Judge a whole series at once: exactly what `update` gives, step by step, and the same state after.

        See `keel.detect.scan` for the contract. The stretches whose outcome is certain are computed in bulk
        (`_divergence_scan`); the rest — warm-up, window resizes, steps near a threshold, findings — goes
        through ``update``.

        Example:
            >>> det = DivergenceDetector()
            >>> losses = np.array([2.0] * 300 + [6.0] * 20)
            >>> [(f.step, f.severity) for f in det.scan(np.arange(320), losses)]
            [(313, 'critical')]
        """
        steps, values = as_series(steps, values)
        finite = np.isfinite(values)  # update ignores the other values entirely
        steps, values = steps[finite], values[finite]
        found: list[Finding] = []
        i, n, size = 0, len(values), SCAN_CHUNK
        holds_negative = len(self._level) > 0 and self._level.ranked(0) < 0  # (a series scanned in pieces)
        if holds_negative or (values < 0).any():  # windows of both signs are not judged: the bulk does not know it
            return [f for k in range(n) for f in self._update_at(steps, values, k)]
        while i < n:
            if not self._in_bulk():
                found += self._update_at(steps, values, i)
                i += 1
                continue
            stop = min(n, i + size)
            chunk = self._prepare(values[i:stop])
            j, m = 0, stop - i
            gallop = m  # the whole chunk first; after a step update took, a little, then further while all is certain
            while j < m:
                ahead = min(m, j + gallop)
                stretch = certain_length(
                    chunk,
                    j,
                    ahead,
                    config=self.config,
                    seen=self._seen,
                    best=self._best,
                    best_se=self._best_se,
                    began=self._start,
                    run=self._episode.run,
                    reported=self._episode.reported,
                )
                self._apply(chunk, j, stretch, steps[i:stop], values[i:stop])
                j += stretch.length
                if j == ahead:
                    gallop *= 2
                    continue
                found += self._update_at(steps, values, i + j)
                j, gallop = j + 1, GALLOP
                if self._pending == chunk.quiet or not self._in_bulk():  # an episode began or ended
                    break
            size = min(2 * size, SCAN_CHUNK_MAX) if j == m else SCAN_CHUNK
            i += j
        return found

    def _update_at(self, steps: np.ndarray, values: np.ndarray, i: int) -> list[Finding]:
        return self.update(Observation(step=int(steps[i]), values={self.config.signal: float(values[i])}))

    def _in_bulk(self) -> bool:
        """Whether the state lets `_divergence_scan` take the next steps (past warm-up, not at an odd moment)."""
        return (
            len(self._diffs) == NOISE_SPAN
            and self.config.short <= NOISE_SPAN
            and not math.isnan(self._noise)
            and len(self._level.values) == self.config.window
            and (self._pending or self._episode.reported is None)
        )

    def _prepare(self, values: np.ndarray) -> Chunk:
        return prepare(
            values,
            config=self.config,
            level=self._level.values,
            diffs=self._diffs,
            size=self._level.size,
            seen=self._seen,
            quiet=not self._pending,
            window_for=self._window_for,
            noise_every=NOISE_EVERY,
            noise=self._noise,
        )

    def _apply(self, chunk: Chunk, start: int, stretch: Stretch, steps: np.ndarray, values: np.ndarray) -> None:
        """What ``update`` does over the stretch's steps of the chunk (``steps``, ``values``: the chunk's)."""
        if not stretch.length:
            return
        stop = start + stretch.length
        if chunk.quiet:
            diffs = chunk.diffs[max(start, stop - NOISE_SPAN) : stop]
            self._diffs.extend(diffs.tolist())
            self._spread.extend(np.abs(diffs).tolist())
        self._level.extend(values[max(start, stop - self.config.window) : stop].tolist())
        self._noise = float(chunk.noise[stop - 1])
        if chunk.size[stop - 1] != self._level.size:  # the stretch's resizes (the best moved with them already)
            self._level.resize(int(chunk.size[stop - 1]))
        self._seen += stretch.length
        self._episode.run += stretch.over
        self._best, self._best_se = stretch.best, stretch.best_se
        if stretch.best_at >= 0:
            self._best_step = int(steps[stretch.best_at])

    def _resize(self, size: int) -> None:
        """Change the window, and move the best with the change in how the level is measured (`moved_best`)."""
        if size == self._level.size:
            return
        before = self._level.median()
        self._level.resize(size)
        self._best = moved_best(self._best, before, self._level.median())

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
            fast = max(
                warn, cfg.noise_margin * math.hypot(median_standard_error(self._noise, cfg.short), self._best_se)
            )
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
        return {
            "config": asdict(self.config),
            "recent": list(self._level.values),
            "size": self._level.size,
            "diffs": list(self._diffs),
            "noise": self._noise,
            "seen": self._seen,
            "best": self._best,
            "best_step": self._best_step,
            "best_se": self._best_se,
            "start": self._start,
            "pending": self._pending,
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = DivergenceConfig(**state["config"])
        size = min(int(state.get("size", self.config.short)), self.config.window)
        self._level = RunningMedian(size=size, capacity=self.config.window, values=state["recent"])
        self._diffs = deque(state.get("diffs", ()), maxlen=NOISE_SPAN)
        self._spread = RunningMedian(size=NOISE_SPAN, capacity=NOISE_SPAN, values=map(abs, self._diffs))
        self._noise = float(state.get("noise", math.nan))
        self._seen, self._best, self._best_step = state["seen"], state["best"], state["best_step"]
        self._best_se = float(state.get("best_se", 0.0))
        self._start = float(state.get("start", math.nan))  # a state saved before the start was kept: no such rule
        self._episode.load_state_dict(state)
        self._pending = bool(state.get("pending", self._episode.run > 0))
