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

from keel.detect.robust import MAD_TO_STD

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
    quiet &= ~(np.abs(ordered).max(axis=1) > HUGE)[at]  # also NaN-safe: a comparison with NaN is not "quiet"
    return ~quiet
