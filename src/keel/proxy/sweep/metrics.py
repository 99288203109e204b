"""Learning-rate sensitivity, best LR and the near-optimal LR range of one loss-vs-LR curve.

Wortsman et al. (2023) summarise a final-loss-vs-LR curve by its *LR sensitivity*:

    LRS = E_{η ∈ [a, b]} [ min(ℓ(A(η)), ℓ₀) − ℓ* ],

where ℓ(A(η)) is the final loss of the run trained with peak LR η, ℓ₀ the loss at initialisation (it caps
runs that diverged or ended worse than where they started, so one blow-up cannot dominate the mean),
ℓ* = min_η ℓ(A(η)) the best loss over the sweep, and E the mean over the log-spaced LR grid. Lower is
more stable; 0 means every LR in the range reached the best loss.

keel's choices where the formula leaves room (each documented on `lr_sensitivity`):

* ℓ₀ is *measured*: the validation loss of the freshly initialised model, on the same batches as the
  final loss (≈ ln 256 = 5.545 nats for the byte-level proxy). ℓ* is taken over the capped curve, so a
  curve whose every run diverged has LRS 0 and ``best_loss`` = ℓ₀ (a flag, not a good result).
* With several seeds, each run is capped first and the capped losses are averaged per LR.
* A non-finite final loss (NaN, ±Inf) counts as ℓ₀: the run diverged.

References:
    Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities",
    arXiv 2309.14322, §2 (no official code; the formula as recorded in keel's seed catalogue, T5, from the
    paper's text and thecharlieblake.co.uk/small-scale-proxies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEAR_OPTIMAL_NATS = 0.1


@dataclass(frozen=True)
class LRSensitivity:
    """The summary of one loss-vs-LR curve.

    Attributes:
        lr_sensitivity: LRS, in nats.
        best_lr: The LR of the lowest capped loss (the smallest such LR on ties).
        best_loss: ℓ*, the lowest capped loss.
        init_loss: ℓ₀, the cap.
        lrs: The curve's LRs, ascending.
        losses: The capped (and seed-averaged) loss at each LR.
        lr_range: (lowest, highest) LR whose capped loss is within ``tolerance`` nats of ℓ*.
        tolerance: The width of ``lr_range`` in nats (0.1).
    """

    lr_sensitivity: float
    best_lr: float
    best_loss: float
    init_loss: float
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    lr_range: tuple[float, float]
    tolerance: float = NEAR_OPTIMAL_NATS


def cap_losses(losses: Sequence[float] | np.ndarray, init_loss: float) -> np.ndarray:
    """min(ℓ, ℓ₀) elementwise, with non-finite losses (a diverged run) counted as ℓ₀."""
    values = np.asarray(losses, dtype=np.float64)
    return np.where(np.isfinite(values), np.minimum(values, init_loss), init_loss)


def lr_sensitivity(
    lrs: Sequence[float],
    losses: Sequence[float] | Sequence[Sequence[float]],
    init_loss: float,
    *,
    tolerance: float = NEAR_OPTIMAL_NATS,
) -> LRSensitivity:
    """LR sensitivity of a final-loss-vs-LR curve, with its best LR and near-optimal LR range.

    Use it on any LR sweep, proxy or not: pass the final (validation) loss per LR and the loss at
    initialisation. The LRs should be log-spaced over the range of interest, since the expectation is the
    plain mean over the grid.

    Args:
        lrs: Peak learning rates, one per curve point, distinct (any order).
        losses: The final loss per LR, or per LR a sequence of final losses over seeds (each capped, then
            averaged). NaN/±Inf means the run diverged and counts as ``init_loss``.
        init_loss: ℓ₀, the loss at initialisation (finite).
        tolerance: Width in nats of the near-optimal ``lr_range``.

    Returns:
        `LRSensitivity`.

    Raises:
        ValueError: Empty or mismatched inputs, repeated or non-positive LRs, a non-finite ``init_loss``
            or a negative ``tolerance``.

    Example:
        >>> r = lr_sensitivity([1e-3, 1e-2, 1e-1], [3.0, 2.0, float("nan")], init_loss=5.0)
        >>> r.lr_sensitivity, r.best_lr, r.lr_range   # mean of (3−2, 2−2, 5−2)
        (1.3333333333333333, 0.01, (0.01, 0.01))

    References:
        Wortsman et al. (2023), arXiv 2309.14322, §2 (module docstring).
    """
    if len(lrs) == 0 or len(lrs) != len(losses):
        raise ValueError(f"lr_sensitivity: {len(lrs)} lrs and {len(losses)} losses; allowed: equal, non-zero")
    if not math.isfinite(init_loss):
        raise ValueError(f"init_loss={init_loss!r}; allowed: a finite number")
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r}; allowed: a number >= 0")
    lr_array = np.asarray(lrs, dtype=np.float64)
    if not np.all(lr_array > 0) or len(np.unique(lr_array)) != len(lr_array):
        raise ValueError(f"lrs={list(lrs)}; allowed: distinct numbers > 0")
    per_lr = []
    for value in losses:
        seeds = np.atleast_1d(np.asarray(value, dtype=np.float64))
        if seeds.size == 0:
            raise ValueError("lr_sensitivity: an LR with no losses; allowed: at least one loss per LR")
        per_lr.append(float(cap_losses(seeds, init_loss).mean()))
    order = np.argsort(lr_array)
    lr_sorted, capped = lr_array[order], np.asarray(per_lr)[order]
    best = int(np.argmin(capped))  # argmin returns the first minimum: the smallest LR on ties
    best_loss = float(capped[best])
    near = lr_sorted[capped <= best_loss + tolerance]
    return LRSensitivity(
        lr_sensitivity=float(np.mean(capped - best_loss)),
        best_lr=float(lr_sorted[best]),
        best_loss=best_loss,
        init_loss=float(init_loss),
        lrs=tuple(float(x) for x in lr_sorted),
        losses=tuple(float(x) for x in capped),
        lr_range=(float(near.min()), float(near.max())),
        tolerance=tolerance,
    )
