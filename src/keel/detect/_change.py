"""How far one loss level is from another: the divergence detector's units, one value at a time or many.

A log-ratio for positive values (a loss falling to 0.1 keeps its scale), the change relative to the first
value's magnitude otherwise. The scalar forms run on every training step; the array forms give `keel doctor`'s
batch scan the same numbers (`relative_changes`: bit for bit, since NumPy's division and ``math.log`` per
value are the scalar form's operations) or, for screening only, within a few ulp (`rises`, NumPy's log).
"""

from __future__ import annotations

import math

import numpy as np


def relative_change(before: float, after: float) -> float:
    """log(after / before) for positive values; else the change relative to ``before``'s magnitude."""
    if before > 0 and after > 0:
        return log_ratio(after, before)
    return (after - before) / max(abs(before), 1e-12)


def rise(median: float, best: float) -> float:
    """How far ``median`` is above ``best``, in the units of `relative_change` (−∞ while there is no best)."""
    if median > 0 and 0 < best < math.inf:
        ratio = median / best  # (the common case, inlined: this runs on every step)
        return math.log(ratio) if ratio > 0 else log_ratio(median, best)
    return relative_change(best, median) if math.isfinite(best) else -math.inf


def log_ratio(a: float, b: float) -> float:
    """log(a / b) of positive finite values, also where a / b underflows to 0 (log would raise)."""
    ratio = a / b
    return math.log(ratio) if ratio > 0 else math.log(a) - math.log(b)


def moved_best(best: float, before: float, after: float) -> float:
    """The best level after the level's measure moved from ``before`` to ``after`` (a wider window's median).

    A wider window reaches further back, so on a falling loss its median is higher: that is a change in how the
    level is measured, not in the level, and the best moves with it (relatively for positive values), so the
    widening itself never reads as a rise. A narrower window's lower median leaves the best where it is.
    """
    if math.isfinite(best) and after > before:
        return best + (after - before if best <= 0 or before <= 0 else best * (after / before - 1))
    return best


@np.errstate(over="ignore", under="ignore")  # as float arithmetic: ±inf and 0, without a warning
def relative_changes(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """`relative_change` element-wise, bit-identical (``math.log`` per value: NumPy's log may differ in the last bit).

    Example:
        >>> relative_changes(np.array([2.0, -1.0]), np.array([4.0, 1.0])).tolist() == [math.log(2.0), 2.0]
        True
    """
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    out = np.empty(len(after))
    positive = (before > 0) & (after > 0)
    ratio = after[positive] / before[positive]
    under = ratio == 0  # the quotient underflowed: a difference of logs, as `log_ratio`
    logs = np.fromiter(map(math.log, np.where(under, 1.0, ratio).tolist()), np.float64, len(ratio))
    for i in np.flatnonzero(under).tolist():
        logs[i] = log_ratio(float(after[positive][i]), float(before[positive][i]))
    out[positive] = logs
    other = ~positive
    out[other] = (after[other] - before[other]) / np.maximum(np.abs(before[other]), 1e-12)
    return out


@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def rises(medians: np.ndarray, best: np.ndarray) -> np.ndarray:
    """`rise` element-wise with NumPy's log: within a few ulp of it, for screening (never for state)."""
    medians, best = np.broadcast_arrays(np.asarray(medians, dtype=np.float64), np.asarray(best, dtype=np.float64))
    positive = (medians > 0) & (best > 0) & (best < math.inf)
    logs = np.log(medians / np.where(positive, best, 1.0))  # an underflow gives -inf where `rise` is very negative
    finite = np.isfinite(best)
    linear = (medians - best) / np.maximum(np.abs(np.where(finite, best, 1.0)), 1e-12)
    return np.where(positive, logs, np.where(finite, linear, -math.inf))
