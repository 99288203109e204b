"""The divergence detector in bulk: how far into a series ``update``'s outcome is certain, and its effect there.

For `DivergenceDetector.scan` (see `keel.detect.scan`). On most steps of a log ``update`` only moves its
windows, re-estimates the noise every 16 steps and perhaps lowers the best median; nothing is judged. Those
per-step quantities are computed here for a whole chunk with NumPy — the same medians
(`robust.rolling_median`), noise (`robust.rolling_step_noise`), windows, standard errors and running best, bit
for bit — and the judgement of each step is screened: a step goes back to ``update`` unless its rise is
clearly (by a relative ``SLACK``) below the threshold, or, during an episode, clearly past it or clearly
between the threshold and its half (then the run count only grows, or nothing happens); any step that could
yield a finding goes to ``update`` too. Window resizes move the best (`_change.moved_best`) in order, between
the vectorised runs of the best. Rises are screened with NumPy's log; everything that is state is exact.

A `Chunk` holds what does not depend on the judgements, so it stays valid across the steps ``update`` takes
as long as the detector stays in the mode it was made for: quiet (each step appends a difference) or in an
episode (the differences, and so the noise, are frozen).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from keel.detect._change import moved_best, relative_changes, rise, rises
from keel.detect.robust import median_standard_error, rolling_median, rolling_step_noise, row_medians

if TYPE_CHECKING:
    from keel.detect.divergence import DivergenceConfig

SLACK = 1e-9  # relative margin of the screened judgements: NumPy's log and hypot are within a few ulp


@dataclass(kw_only=True)
class Chunk:
    """Per-step quantities of a run of finite values that do not depend on any judgement.

    Attributes:
        quiet: Made for the quiet mode (True: each step appends a difference) or an episode (False).
        diffs: The difference each step appends (quiet mode).
        noise: The noise after each step (re-estimated every ``noise_every`` values).
        size: The window after each step.
        resized: Steps whose re-estimate changes the window.
        medians: The median over ``size`` values ending at each step.
        previous: At a resized step, the median over the window before it (NaN elsewhere).
        se: The standard error of that median.
        fast, fast_se: The median of the last ``short`` values and its standard error (NaN where the window is
            ``short``: there is no second view).
    """

    quiet: bool
    diffs: np.ndarray
    noise: np.ndarray
    size: np.ndarray
    resized: np.ndarray
    medians: np.ndarray
    previous: np.ndarray
    se: np.ndarray
    fast: np.ndarray
    fast_se: np.ndarray


@dataclass(kw_only=True)
class Stretch:
    """What ``update`` does over ``length`` steps of a chunk, in bulk.

    Attributes:
        length: Steps whose outcome is certain; the next one (if any) goes through ``update``.
        best, best_se: The best median and its standard error after them.
        best_at: Chunk index of the last new best median (−1: none; a resize moves the best, not its step).
        over: Steps past the threshold (an episode's run grows by as many).
    """

    length: int
    best: float
    best_se: float
    best_at: int = -1
    over: int = 0


@np.errstate(over="ignore", invalid="ignore", under="ignore")  # float arithmetic: ±inf, NaN, 0
def prepare(
    x: np.ndarray,
    *,
    config: DivergenceConfig,
    level: Sequence[float],
    diffs: Sequence[float],
    size: int,
    seen: int,
    quiet: bool,
    window_for: Callable[[float], int],
    noise_every: int,
    noise: float,
) -> Chunk:
    """The `Chunk` of finite values ``x`` from the detector's state (its level window full, its noise known)."""
    m, short = len(x), config.short
    tail = np.asarray(level, dtype=np.float64)
    d = relative_changes(np.concatenate([tail[-1:], x[:-1]]), x) if quiet else np.zeros(0)
    noise_at, size_at = np.full(m, noise), np.full(m, size)
    first = -(seen + 1) % noise_every  # the first step whose count of seen values is a multiple of it
    at = np.arange(first, m, noise_every)
    resized = np.zeros(m, dtype=bool)
    if len(at):
        spread = np.concatenate([np.asarray(diffs, dtype=np.float64), d])
        if quiet:
            estimates = rolling_step_noise(spread[first + 1 :], len(diffs), every=noise_every)
        else:  # frozen differences: every estimate is the same (not necessarily the noise before the episode)
            estimates = np.full(len(at), rolling_step_noise(spread, len(diffs))[0])
        # the window grows with the noise: when the lowest and the highest estimate keep it, all do
        if window_for(float(estimates.min())) == size == window_for(float(estimates.max())):
            sizes = np.full(len(at), size)
        else:
            distinct, which = np.unique(estimates, return_inverse=True)
            sizes = np.array([window_for(v) for v in distinct.tolist()])[which]
        latest = (np.arange(m) - first) // noise_every  # the last re-estimate at or before each step (-1: none)
        noise_at = np.where(latest >= 0, estimates[np.maximum(latest, 0)], noise)
        size_at = np.where(latest >= 0, sizes[np.maximum(latest, 0)], size)
        resized[at] = sizes != np.concatenate([[size], sizes[:-1]])
    medians, se, previous = np.empty(m), np.empty(m), np.full(m, math.nan)
    fast, fast_se = np.full(m, math.nan), np.full(m, math.nan)
    fast_rows = np.flatnonzero(size_at > short)
    if len(fast_rows):
        fast[fast_rows] = _medians_at(tail, x, short, fast_rows)
        fast_se[fast_rows] = median_standard_error(noise_at[fast_rows], short)
    for s in [int(size_at[0])] if size_at.min() == size_at.max() else np.unique(size_at).tolist():
        rows = np.flatnonzero(size_at == s)
        medians[rows] = _medians_at(tail, x, s, rows)
        se[rows] = median_standard_error(noise_at[rows], s)
    moved = np.flatnonzero(resized)
    if len(moved):
        old = np.concatenate([[size], size_at[:-1]])[moved]  # the window each resized step leaves
        for s in np.unique(old).tolist():
            rows = moved[old == s]
            previous[rows] = _medians_at(tail, x, s, rows)
    return Chunk(
        quiet=quiet,
        diffs=d,
        noise=noise_at,
        size=size_at,
        resized=resized,
        medians=medians,
        previous=previous,
        se=se,
        fast=fast,
        fast_se=fast_se,
    )


def _medians_at(tail: np.ndarray, x: np.ndarray, size: int, rows: np.ndarray) -> np.ndarray:
    """The median of the ``size`` values ending at each of ``rows`` of ``x`` (earlier ones from ``tail``)."""
    values = np.concatenate([tail[len(tail) - size + 1 :], x])  # window of row r: values[r:r + size]
    first, last = int(rows[0]), int(rows[-1])
    if 2 * len(rows) >= last - first + 1:  # dense: every window of the span (a view), then pick
        return rolling_median(values[first : last + size], size)[rows - first]
    return row_medians(sliding_window_view(values, size)[rows])  # sparse: copy just those windows


@np.errstate(over="ignore", invalid="ignore", under="ignore")  # float arithmetic: ±inf, NaN, 0
def certain_length(
    chunk: Chunk,
    start: int,
    stop: int,
    *,
    config: DivergenceConfig,
    seen: int,
    best: float,
    best_se: float,
    began: float,
    run: int,
    reported: str | None,
) -> Stretch:
    """How many steps of ``chunk[start:stop]`` have a certain outcome from the detector's state, and their effect.

    ``seen``, ``best``, ``best_se``, ``began`` (its level over the run's first steps), ``run`` and ``reported`` are
    the detector's, before step ``start``.
    """
    m = stop - start
    medians, se = chunk.medians[start:stop], chunk.se[start:stop]
    best_at, best_se_at, last = np.empty(m), np.empty(m), np.empty(m, dtype=np.int64)
    # the running best: a full-window median lower by more than the standard errors' difference (as update),
    # vectorised between the resizes that may move it (a wider window's higher median; each step resizes first)
    resized = np.flatnonzero(chunk.resized[start:stop])
    cuts = resized[chunk.previous[start + resized] < medians[resized]].tolist()
    lo, updated, level, level_se = 0, -1, best, best_se
    for hi in [*cuts, m]:
        if hi > lo:
            keys = medians[lo:hi] + se[lo:hi]
            before = np.minimum.accumulate(np.concatenate([[level + level_se], keys]))[:-1]
            at = np.maximum.accumulate(np.where(keys < before, np.arange(lo, hi), -1))
            best_at[lo:hi] = np.where(at >= 0, medians[np.maximum(at, 0)], level)
            best_se_at[lo:hi] = np.where(at >= 0, se[np.maximum(at, 0)], level_se)
            last[lo:hi] = np.where(at >= 0, at, updated)
            level, level_se, updated = float(best_at[hi - 1]), float(best_se_at[hi - 1]), int(last[hi - 1])
        if hi < m:
            level = moved_best(level, float(chunk.previous[start + hi]), float(medians[hi]))
        lo = hi
    uncertain, past = _judgements(
        config, chunk, start, stop, best_at, best_se_at, began, seen + 1 + np.arange(m), run, reported
    )
    length = int(np.argmax(uncertain)) if uncertain.any() else m
    if length == 0:
        return Stretch(length=0, best=best, best_se=best_se)
    k = int(last[length - 1])
    return Stretch(
        length=length,
        best=float(best_at[length - 1]),
        best_se=float(best_se_at[length - 1]),
        best_at=start + k if k >= 0 else -1,
        over=int(np.count_nonzero(past[:length])),
    )


def critical_rise(config: DivergenceConfig, began: float, best: float, fall_required: float) -> float:
    """The rise that makes a divergence critical: ``critical_excess`` over the best, or the rise back to where the
    run began (``began``, a median of ``short`` values) when that is less and the fall from there to the best was
    itself past ``fall_required`` (the margin of a median of ``short`` values over the best)."""
    doubled = math.log1p(config.critical_excess)
    back = rise(began, best)  # NaN before the start is known: not less
    return back if fall_required <= back < doubled else doubled


@np.errstate(over="ignore", invalid="ignore")
def critical_rises(config: DivergenceConfig, began: float, best: np.ndarray, fall_required: np.ndarray) -> np.ndarray:
    """`critical_rise` element-wise (screening: within a few ulp of it)."""
    doubled = math.log1p(config.critical_excess)
    back = rises(np.full(len(best), began), best)
    return np.where((fall_required <= back) & (back < doubled), back, doubled)


@np.errstate(over="ignore", invalid="ignore")
def _judgements(
    cfg: DivergenceConfig,
    chunk: Chunk,
    start: int,
    stop: int,
    best: np.ndarray,
    best_se: np.ndarray,
    began: float,
    seen_at: np.ndarray,
    run: int,
    reported: str | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(where ``update``'s judgement of the step is not certain — NaN and ±inf included —, where it extends an
    episode's run)."""
    warn = math.log1p(cfg.warn_excess)
    rise = rises(chunk.medians[start:stop], best)
    required = np.maximum(warn, cfg.noise_margin * np.hypot(chunk.se[start:stop], best_se))
    over = rise - required
    tol = SLACK * (1 + np.abs(rise) + np.abs(required))
    two = chunk.size[start:stop] > cfg.short  # where the fast view (the last `short` values) is judged too
    torn = np.zeros(len(best), dtype=bool)
    fall_required = required  # the margin of a median of `short` values: the wide one's where that is `short`
    if two.any():
        fast_rise = rises(chunk.fast[start:stop], best)
        fast_required = np.maximum(warn, cfg.noise_margin * np.hypot(chunk.fast_se[start:stop], best_se))
        fast_over = np.where(two, fast_rise - fast_required, -math.inf)
        fall_required = np.where(two, fast_required, required)
        tol = tol + np.where(two, SLACK * (np.abs(fast_rise) + np.abs(fast_required)), 0.0)
        chosen = fast_over > over  # update judges by the view furthest past its threshold
        torn = two & ~(np.abs(fast_over - over) > tol)
        rise, required = np.where(chosen, fast_rise, rise), np.where(chosen, fast_required, required)
        over = np.where(chosen, fast_over, over)
    if chunk.quiet:  # nothing happens below the threshold (or before min_history)
        return (seen_at >= cfg.min_history) & ~(over < -tol), np.zeros(len(best), dtype=bool)
    # an episode: a step clearly past the threshold extends the run; the rest (a step below it, which ends the run
    # of consecutive steps or the episode, an uncertain side, a possible finding) goes to update
    past = over > tol
    critical = rise - critical_rises(cfg, began, best, fall_required)
    uncertain = (seen_at < cfg.min_history) | ~past | torn | (past & ~(np.abs(critical) > tol))
    if reported != "critical":
        reportable = (critical > tol) if reported == "warning" else np.ones(len(best), dtype=bool)
        uncertain |= past & (run + np.cumsum(past) >= cfg.patience) & reportable
    return uncertain, past
