"""Which steps of a quiet stretch could a spike detector flag? A vectorised screen for batch scans.

On a quiet stretch the spike detector's only change of state is "append the value to the window", so the
baseline of every step is known in advance: the window before the stretch followed by the stretch itself.
Computing that exact rolling median and MAD in NumPy costs two partitions of 64 values per step; this screen
instead bounds them from below, block by block, which costs a sort of about 9 values per step, and flags
every step whose value could reach the thresholds under those bounds. The detector's own ``update`` then
judges each flagged step exactly, so the screen only has to be safe (never miss a step ``update`` would
flag), not tight; a flagged step ``update`` finds quiet costs one ``update``.

The bounds, for a block of B consecutive steps whose windows (w values each) all lie inside the w + B − 1
values U of the block (sorted: U₀ ≤ U₁ ≤ …; lo, hi = the middle positions of a window of w):

- the median m of each window lies in [U_lo, U_(hi+B−1)] (an order statistic of a subset lies between those
  of the superset at the same rank and at that rank plus the values left out);
- the MAD is at least d when fewer than lo + 1 values of U lie within d of [U_lo, U_(hi+B−1)], i.e. d up to the
  (E+1)-th smallest distance from that interval to the values outside it, E = lo − (hi − lo + B).

Float rounding is covered by a relative slack (``SLACK``) far above the rounding of one operation; a block
holding values near the float range's end (a mean of two that overflows) is flagged whole.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from keel.detect.robust import MAD_TO_STD, rolling_median, row_medians, step_noise_of

SLACK = 1e-9  # relative margin on every bound: rounding moves each operation by ~1e-16
HUGE = 1e300  # beyond this, means and differences may overflow: the block is not screened


@np.errstate(over="ignore", invalid="ignore")  # ±inf and NaN bounds are never "quiet" (see the last lines)
def possible_spikes(
    window: np.ndarray,
    values: np.ndarray,
    *,
    log: bool,
    threshold: float,
    min_excess: float,
    scale_floor: float,
    error: float = 0.0,
    shifts: tuple[np.ndarray, int, float] | None = None,
) -> np.ndarray:
    """A mask over ``values``: True where the spike detector might flag the value (False: certainly quiet).

    Args:
        window: The detector's full window of accepted values, oldest first (in its units: log or linear).
        values: The next values, in the same units, each assumed accepted (the stretch is quiet up to the
            first flagged one; what follows a flagged one is re-screened from the detector's new state).
        log: Whether the detector compares log-values (excess = exp(y − m) − 1) or linear ones.
        threshold, min_excess, scale_floor: The detector's `SpikeConfig` fields of those names.
        error: A bound on the relative error of ``window`` and ``values`` against the detector's own values
            (NumPy's log is cheaper than ``math.log`` per value, and may differ from it in the last bits).
        shifts: The level-shift test's (`spike`) inputs, if it runs: each value's recent median (within ``error`` of
            the detector's), the rank in its window below which the median of the older values cannot lie, and the
            least log-rise over that median that counts. Only that necessary condition is screened (not the z).

    Example:
        >>> window = np.log(np.full(64, 2.0) * (1 + 0.01 * (np.arange(64) % 3)))
        >>> values = np.log(np.array([2.01, 2.0, 6.0, 2.02]))
        >>> possible_spikes(window, values, log=True, threshold=6.0, min_excess=0.1, scale_floor=0.01).tolist()
        [False, False, True, False]
    """
    w, m = len(window), len(values)
    if m == 0:
        return np.zeros(0, dtype=bool)
    block = max(1, w // 8)  # smaller blocks: tighter bounds, more sorting
    acc = np.concatenate([window, values])
    blocks = -(-m // block)
    span = w + block - 1
    pad = blocks * block + w - 1 - len(acc)  # the last block's windows may end before its U does
    if pad > 0:  # any extra values only widen U, which keeps the bounds safe
        acc = np.concatenate([acc, np.full(pad, acc[-1])])
    ordered = np.sort(sliding_window_view(acc, span)[::block][:blocks], axis=1)  # (blocks, span)
    lo, hi = (w - 1) // 2, w // 2
    low, high = ordered[:, lo], ordered[:, hi + block - 1]  # the range of every window's median in the block
    # values off by at most eta move every order statistic by at most eta, and each distance by 2 eta
    eta = error * np.abs(ordered).max(axis=1)
    extra = lo - (hi - lo + block)
    if extra >= 0:
        # the (extra+1)-th smallest distance outwards: below and above are each ascending, so it is the least,
        # over the ways to take i of them from below and extra+1-i from above, of the largest taken
        reach = np.arange(extra + 1)
        below = low[:, None] - ordered[:, lo - 1 - reach]  # (blocks, extra+1), ascending
        above = ordered[:, hi + block + reach] - high[:, None]
        spread = np.minimum(below[:, extra], above[:, extra])  # i = extra+1 or 0
        if extra:
            spread = np.minimum(spread, np.maximum(below[:, :extra], above[:, extra - 1 :: -1]).min(axis=1))
        scale = MAD_TO_STD * np.maximum(spread - 2 * eta, 0.0) * (1 - SLACK)
    else:
        scale = np.zeros(blocks)
    if log:
        floor = np.full(blocks, scale_floor)
    else:
        magnitude = np.where((low <= 0) & (high >= 0), 0.0, np.minimum(np.abs(low), np.abs(high)))
        floor = scale_floor * magnitude + 1e-12
    # per value: its block's bounds; the rise over the lowest possible median bounds z and the excess
    at = np.arange(m) // block
    rise = values - low[at] + 2 * eta[at]
    quiet = rise / np.maximum(scale, floor)[at] < threshold * (1 - SLACK)
    if log:
        quiet |= rise < math.log1p(min_excess) * (1 - SLACK)
    else:
        quiet |= rise / (magnitude[at] + 1e-12) < min_excess * (1 - SLACK)
    if shifts is not None:  # the older values' median is at least U's value of that rank (U holds their window)
        recent, rank, least = shifts
        quiet &= recent - ordered[at, rank] + 2 * eta[at] < least * (1 - SLACK)
    quiet &= ~(np.abs(ordered).max(axis=1) > HUGE)[at]  # also NaN-safe: a comparison with NaN is not "quiet"
    return ~quiet


@np.errstate(over="ignore", invalid="ignore")
def possible_descent_spikes(
    window: np.ndarray,
    values: np.ndarray,
    *,
    recent: int,
    threshold: float,
    min_excess: float,
    scale_floor: float,
    error: float = 0.0,
) -> np.ndarray:
    """A mask over log-``values``: True where the spike detector might flag the value against a steep descent's
    baseline (the median of the last ``recent`` values of its window, the window's step noise; `spike`).

    Whether the window is such a descent is not checked: a step judged against the window's own median is
    `possible_spikes`'s, so the union of the two masks is safe. Both statistics are computed exactly (the same
    order statistics as the detector's), widened by ``error`` for NumPy's log.

    Args:
        window: The detector's full window of accepted log-values, oldest first.
        values: The next log-values, each assumed accepted.
        recent: Values whose median is the descent's level.
        threshold, min_excess, scale_floor: The detector's `SpikeConfig` fields of those names (log space).
        error: As for `possible_spikes`.

    Example:
        >>> window = np.log(9.0 * 45.0 ** (-np.arange(40) / 40))  # a loss falling 45× in 40 steps
        >>> possible_descent_spikes(window, np.log([0.2, 300.0]), recent=8, threshold=6.0, min_excess=0.1,
        ...                         scale_floor=0.01).tolist()
        [False, True]
    """
    w, m = len(window), len(values)
    if m == 0 or w < max(recent, 2):
        return np.ones(m, dtype=bool) if m else np.zeros(0, dtype=bool)
    acc = np.concatenate([window, values])
    top = float(np.abs(acc).max())  # finite values (the scan's); NaN or inf leaves every value in doubt below
    eta = error * top
    level = rolling_median(acc[w - recent : w - 1 + m], recent)  # value k's: acc[k + w - recent : k + w]
    rise = values - level + 2 * eta
    maybe = ~(rise < math.log1p(min_excess) * (1 - SLACK))  # NaN-safe: not provably quiet
    # a lower bound on each value's step noise first, block by block as in `possible_spikes`: the median of a
    # window's w − 1 differences is at least the same rank of their union over the block (zeros pad the end)
    # (only for the blocks that hold a value the excess leaves in doubt: most of a healthy stretch is not)
    diffs = np.abs(np.diff(acc))
    block = max(1, (w - 1) // 8)
    span = w - 1 + block - 1
    doubt = np.zeros(-(-m // block), dtype=bool)
    doubt[np.flatnonzero(maybe) // block] = True
    held = np.flatnonzero(doubt)
    if not len(held):
        return maybe  # no value in doubt (and too few values after the window for a block's span of differences)
    diffs_padded = np.concatenate([diffs, np.zeros(max(0, (held[-1] + 1) * block + w - 2 - len(diffs)))])
    least = np.sort(sliding_window_view(diffs_padded, span)[held * block], axis=1)[:, (w - 2) // 2]
    noise_low = np.full(-(-m // block), np.inf)
    noise_low[held] = step_noise_of(least) * (1 - SLACK) - 4 * eta
    maybe &= ~(rise / np.maximum(noise_low[np.arange(m) // block], scale_floor) < threshold * (1 - SLACK))
    at = np.flatnonzero(maybe)
    if len(at):
        spans = sliding_window_view(diffs, w - 1)[at]  # value k's window's differences
        noise = step_noise_of(row_medians(spans)) * (1 - SLACK) - 4 * eta
        quiet = rise[at] / np.maximum(noise, scale_floor) < threshold * (1 - SLACK)
        quiet &= not top > HUGE  # also NaN-safe
        maybe[at] = ~quiet
    return maybe
