"""Lead time: when did the loss degrade, and how many steps before that did a finding fire?

"Degraded" is judged after the fact, on the whole loss curve:

- the first non-finite loss; or
- the first single-step spike: a loss ``spike`` above the median of the ``window // 2`` steps before it and
  ``SPIKE_Z`` robust standard deviations above it in log space (the larger of those steps' spread and the run's
  step-to-step noise): a poisoned batch, an LR jump, damage of one step, which smoothing would hide — a noisy
  loss's one-batch outlier is not one; with a reference run, only where the loss is also ``rel`` above the
  reference's at that step (a hard batch both runs see is the data, not a degradation); or
- with a reference run (the same recipe with the fix applied, same data order), the first step from
  which the run's smoothed loss stays ``rel`` above the reference's for ``sustain`` steps, and whose own
  loss is ``rel`` above the reference's on the same batch: the loss is worse than it would have been; or
- without one, the first step from which the smoothed loss stays ``rise`` above its best level so far, and
  ``SMOOTHED_Z`` standard errors of the running median above it (the best so far is a low draw of a noisy
  loss), for ``sustain`` steps (a spike or divergence that lasts).

The noise both rules allow for is the run's own step-to-step noise as it was in the ~1,000 steps before each step
(`_step_noise`): a run that blows up late must not raise the bar for its earlier steps.

Smoothing is a centred running median of ``window`` steps, robust to single-batch noise; the step found
must itself be worse, and without a reference it must be the first of ``HOLD`` worse steps in a row (looked for
over the next ``window // 2`` steps): on a noisy loss a step just before a change is worse by chance, and its
centred window already holds the worse steps after it. The comparison
with a reference is the honest one for instabilities that stall a run rather than blow it up (attention-
logit growth at a high LR often leaves the loss on a plateau): there is no rise to see, only a gap to
what the fixed recipe reaches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

CHUNK = 65536  # rows of a sliding-window view reduced at once: bounded memory for million-step runs
HOLD = 3  # steps in a row a degradation's first step must be worse for, without a reference run
SPIKE_Z = 6.0  # a one-step spike also rises this many robust standard deviations of the steps before it
MAD_TO_SIGMA = 1.4826  # a normal distribution's standard deviation per median absolute deviation
NOISE_BLOCK = 64  # steps per block of the trailing noise estimate (`_step_noise`)
NOISE_BLOCKS = 16  # blocks it takes the median over: the ~1,000 steps before a step
SMOOTHED_Z = 6.0  # a lasting rise also clears this many standard errors of the running median, without a reference


def running_median(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Centred running median over ``2·(window // 2) + 1`` steps (shorter windows at the ends); non-finite
    values are left out. Vectorised: a million steps take about a second, so a `Guard` can afford it at close.

    Example:
        >>> running_median([1.0, 9.0, 1.0, 1.0, 1.0], 3).tolist()
        [5.0, 1.0, 1.0, 1.0, 1.0]
    """
    x = np.asarray(values, dtype=np.float64)
    half = window // 2
    padded = np.concatenate([np.full(half, np.nan), np.where(np.isfinite(x), x, np.nan), np.full(half, np.nan)])
    return _windowed(padded, 2 * half + 1, len(x), np.nanmedian)


def _windowed(x: np.ndarray, width: int, rows: int, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """``reduce`` over ``x[i : i + width]`` for i < rows, in chunks (all-NaN windows give NaN, quietly)."""
    out = np.full(rows, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmedian of an all-NaN window
        for lo in range(0, rows, CHUNK):
            hi = min(rows, lo + CHUNK)
            out[lo:hi] = reduce(sliding_window_view(x[lo : hi + width - 1], width), axis=1)
    return out


def degradation_step(
    losses: Sequence[float],
    reference: Sequence[float] | None = None,
    *,
    window: int = 21,
    rel: float = 0.03,
    rise: float = 0.15,
    spike: float = 0.5,
    sustain: int = 20,
    start: int = 0,
) -> int | None:
    """The first step at which the loss is degraded (see the module doc), or None.

    A loss (or reference) at or below 0 somewhere has no relative level to be worse than: only its first
    non-finite value dates it (a GRPO or PPO surrogate loss is about 0, of either sign).

    Args:
        losses: The run's loss per step.
        reference: The reference run's loss per step (same steps and batches), or None; steps past its end
            are never "worse than the reference" (only a spike or a non-finite loss can date them).
        window: Running-median width.
        rel: Gap to the reference that counts (0.03 = 3 % worse).
        rise: Rise above the run's own best that counts, without a reference.
        spike: Rise of one step above the median of the steps before it that counts (0.5 = 1.5×).
        sustain: Steps the condition must hold (fewer only at the end of the run).
        start: Ignore steps before this one (e.g. a known event).

    Example:
        >>> degradation_step([2.0] * 50 + [3.0] * 50)
        50
        >>> degradation_step([2.0] * 100, reference=[2.0] * 40 + [1.5] * 60)
        40
    """
    n = len(losses)
    x = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(x[start:]))
    first_bad = start + int(bad[0]) if bad.size else None
    raw_ref = None
    if reference is not None:
        raw_ref = np.full(n, np.nan)
        given = np.asarray(reference[:n], dtype=np.float64)
        raw_ref[: len(given)] = given
    if not _positive(x) or (raw_ref is not None and not _positive(raw_ref)):
        return first_bad  # "x % worse" means nothing for a loss at or below 0 (a policy-gradient surrogate)
    # one-step spikes: x[t] against the median of the `back` steps before it (NaN there: no spike)
    back = max(1, window // 2)
    spikes = np.zeros(n, dtype=bool)
    if n > back:
        before = _windowed(x, back, n - back, np.median)  # before[i] = median(x[i : i + back]), for t = i + back
        spikes[back:] = x[back:] >= (1 + spike) * before
        # and far outside the noise of those steps: a noisy loss's one-batch outliers are no spike (the few
        # candidates only: a million steps' spread would cost more than the rest of this function)
        at = np.flatnonzero(spikes[back:])
        if at.size:
            # in log space, where a loss's batch noise is about symmetric (a linear scale's long right tail made
            # one batch in a few hundred of a ±50 % noisy loss a "spike")
            with np.errstate(divide="ignore", invalid="ignore"):
                logs, centre = np.log(x), np.log(before[at])
            rows = sliding_window_view(logs, back)[at]  # the `back` steps before each candidate
            local = MAD_TO_SIGMA * np.median(np.abs(rows - centre[:, None]), axis=1)
            noise = np.maximum(local, _step_noise(logs)[back + at])  # ten values' spread is often small by chance
            spikes[back + at] = logs[back + at] - centre >= SPIKE_Z * noise
        if raw_ref is not None:  # a hard batch the reference run also found hard is the data
            spikes &= ~(x < (1 + rel) * raw_ref)
    spikes[:start] = False
    hits = np.flatnonzero(spikes)
    first_spike = int(hits[0]) if hits.size else None
    run = running_median(losses, window)
    if raw_ref is not None:
        ref = running_median(raw_ref, window)
        worse = run >= (1 + rel) * ref
        # same data order: the step itself is judged on its own batch, against the reference's loss there
        # (against the smoothed reference, a hard batch both runs see would count as degraded)
        raw_worse = x >= (1 + rel) * raw_ref
    else:
        best = np.fmin.accumulate(np.where(np.isfinite(run), run, np.inf))
        # the lowest running median so far is itself a low draw of a noisy loss: the rise must also clear the
        # running median's own noise (`SMOOTHED_Z` of its standard errors) to count
        margin = SMOOTHED_Z * _smoothed_noise(x, window)
        floor = np.concatenate([[np.inf], np.maximum((1 + rise) * best[:-1], best[:-1] + margin[1:])])
        worse = run >= floor
        raw_worse = x >= floor
    # worse on all of [t, min(n, t + sustain)): no "not worse" step in that range (prefix counts)
    not_worse = np.concatenate([[0], np.cumsum(~worse)])
    ends = np.minimum(n, np.arange(n) + sustain)
    held = not_worse[ends] - not_worse[np.arange(n)] == 0
    # the step itself must be worse too: a centred median would otherwise date a change up to
    # window/2 steps before it happened
    ok = raw_worse & held
    ok[:start] = False
    found_at = np.flatnonzero(ok)
    found = None
    if found_at.size:
        # without a reference, a step before the change is worse by chance on a noisy loss, and its centred
        # median already holds the steps after it: the change point of the steps around it dates the change
        # (with one, each step is judged against the same batch in the reference run: no such chance)
        found = int(found_at[0])
        if raw_ref is None:
            found = _first_lasting(raw_worse, ok, found, window)
    candidates = [s for s in (first_bad, first_spike, found) if s is not None]
    return min(candidates) if candidates else None


def _step_noise(x: np.ndarray) -> np.ndarray:
    """Each step's σ of step-to-step noise, as the run had it before that step: robust, from the differences of
    consecutive steps (Var(a − b) = 2σ²; a trend or a level shift barely moves their median), by blocks of
    ``NOISE_BLOCK`` steps, the median of the ``NOISE_BLOCKS`` blocks before the step's own (its own block in the
    first). Trailing, not the whole run's: a run that blows up late has far larger differences there, which must not
    raise the bar for its earlier steps."""
    n = len(x)
    diffs = np.abs(np.diff(x))
    diffs = np.concatenate([diffs, np.full(-len(diffs) % NOISE_BLOCK, np.nan)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks (non-finite stretches) give NaN
        per_block = np.nanmedian(diffs.reshape(-1, NOISE_BLOCK), axis=1)
        blocks = len(per_block)
        padded = np.concatenate([np.full(NOISE_BLOCKS - 1, np.nan), per_block])
        trailing = _windowed(padded, NOISE_BLOCKS, blocks, np.nanmedian)  # blocks k−NOISE_BLOCKS+1 … k
    before = np.concatenate([trailing[:1], trailing[:-1]])  # the blocks before block k (block 0: its own)
    sigma = MAD_TO_SIGMA * np.repeat(before, NOISE_BLOCK)[:n] / math.sqrt(2)
    return np.where(np.isfinite(sigma), sigma, 0.0)


def _smoothed_noise(x: np.ndarray, window: int) -> np.ndarray:
    """The standard error of a ``window``-step running median of ``x`` at each step: σ × 1.2533 / √window."""
    return 1.2533 * _step_noise(x) / math.sqrt(2 * (window // 2) + 1)


def _positive(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return bool(np.all(finite > 0))


def _first_lasting(raw_worse: np.ndarray, ok: np.ndarray, t: int, window: int) -> int:
    """The first step in ``[t, t + window // 2]`` that ``ok`` allows and from which the loss is worse at each of the
    next `HOLD` steps (fewer at the end of the run); ``t`` if none is.

    On a noisy loss a step just before a change is worse by chance, and its centred median already holds the worse
    steps after it; chance seldom makes `HOLD` steps in a row worse. A ramp's first worse step is followed by worse
    steps: it stays the onset (a split into two levels would date a ramp at its middle, up to ``window // 2`` late).
    """
    n = len(raw_worse)
    for s in range(t, min(n, t + window // 2 + 1)):
        if ok[s] and raw_worse[s : min(n, s + HOLD)].all():
            return s
    return t


def lead_steps(detected_step: int | None, degraded_step: int | None) -> int | None:
    """Steps from detection to degradation (positive: the finding came first); None if either is unknown."""
    if detected_step is None or degraded_step is None:
        return None
    return degraded_step - detected_step
