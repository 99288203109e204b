"""Lead time: when did the loss degrade, and how many steps before that did a finding fire?

"Degraded" is judged after the fact, on the whole loss curve:

- the first non-finite loss; or
- the first single-step spike: a loss ``spike`` above the median of the ``window // 2`` steps before it
  (a poisoned batch, an LR jump: the damage is one step, which smoothing would hide) — with a reference
  run, only where the loss is also ``rel`` above the reference's at that step (a hard batch both runs see
  is the data, not a degradation); or
- with a reference run (the same recipe with the remedy applied, same data order), the first step from
  which the run's smoothed loss stays ``rel`` above the reference's for ``sustain`` steps, and whose own
  loss is ``rel`` above the reference's on the same batch: the loss is worse than it would have been; or
- without one, the first step from which the smoothed loss stays ``rise`` above its best level so far for
  ``sustain`` steps (a spike or divergence that lasts).

Smoothing is a centred running median of ``window`` steps, robust to single-batch noise; the step found
must itself be worse, so the centred window does not date the change before it happened. The comparison
with a reference is the honest one for instabilities that stall a run rather than blow it up (attention-
logit growth at a high LR often leaves the loss on a plateau): there is no rise to see, only a gap to
what the fixed recipe reaches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def running_median(values: Sequence[float], window: int) -> np.ndarray:
    """Centred running median (shorter windows at the ends); non-finite values are left out.

    Example:
        >>> running_median([1.0, 9.0, 1.0, 1.0, 1.0], 3).tolist()
        [5.0, 1.0, 1.0, 1.0, 1.0]
    """
    x = np.asarray(values, dtype=np.float64)
    half = window // 2
    out = np.empty(len(x))
    for i in range(len(x)):
        part = x[max(0, i - half) : i + half + 1]
        part = part[np.isfinite(part)]
        out[i] = np.median(part) if part.size else math.nan
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

    Args:
        losses: The run's loss per step.
        reference: The reference run's loss per step (same steps), or None.
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
    back = max(1, window // 2)
    raw_ref = np.asarray(reference[:n], dtype=np.float64) if reference is not None else None
    first_spike = next((t for t in range(max(start, back), n)
                        if x[t] >= (1 + spike) * np.median(x[t - back : t])
                        and (raw_ref is None or t >= len(raw_ref) or not x[t] < (1 + rel) * raw_ref[t])), None)
    run = running_median(losses, window)
    if raw_ref is not None:
        ref = running_median(reference[:n], window)  # type: ignore[index]
        worse = run >= (1 + rel) * ref
        # same data order: the step itself is judged on its own batch, against the reference's loss there
        # (against the smoothed reference, a hard batch both runs see would count as degraded)
        raw_worse = np.zeros(n, dtype=bool)
        raw_worse[: len(raw_ref)] = x[: len(raw_ref)] >= (1 + rel) * raw_ref
    else:
        best = np.fmin.accumulate(np.where(np.isfinite(run), run, np.inf))
        floor = (1 + rise) * np.concatenate([[np.inf], best[:-1]])
        worse = run >= floor
        raw_worse = x >= floor
    found = None
    for t in range(start, n):
        end = min(n, t + sustain)
        # the step itself must be worse too: a centred median would otherwise date a change up to
        # window/2 steps before it happened
        if raw_worse[t] and worse[t:end].all():
            found = t
            break
    candidates = [s for s in (first_bad, first_spike, found) if s is not None]
    return min(candidates) if candidates else None


def lead_steps(detected_step: int | None, degraded_step: int | None) -> int | None:
    """Steps from detection to degradation (positive: the finding came first); None if either is unknown."""
    if detected_step is None or degraded_step is None:
        return None
    return degraded_step - detected_step
