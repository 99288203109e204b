"""Kendall's τ-b, the rank correlation with ties, as pure Python: one home for the eval-stability tracker
(`keel.detect.eval_stability`) and the report's eval table (`keel.report.eval_stability_section`), which may
import only `_core` and `keel.store`.

τ-b (Kendall 1945) counts, over the n(n−1)/2 pairs (i, j), whether x and y order the pair the same way:

    τ_b = Σ_{i<j} sgn(x_i − x_j)·sgn(y_i − y_j) / √( Σ_{i<j} sgn(x_i − x_j)² · Σ_{i<j} sgn(y_i − y_j)² )

The numerator is concordant − discordant pairs; each sum under the root is the number of pairs *not* tied in that
variable, n₀ − n₁ and n₀ − n₂ in Kendall's notation. It is what ``scipy.stats.kendalltau`` computes by default
(``variant="b"``), and what BOSE (Yang et al., ACL Findings 2025, arXiv 2503.00812) uses to score an evaluation's
stability across checkpoints. O(n²): checkpoint rankings are tens of items, not millions.

It also holds the line between an eval that can rank checkpoints and one too noisy to (`NOISY_RANK_TAU`, read by
`keel.detect.eval_stability` and the report), with its reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# The bootstrap rank τ (`keel.detect.eval_stability.rank_stability`) of checkpoints that do not differ at all is
# 0.5, not 0: each resample's means scatter around the full-data means as much as those scatter around the truth
# (correlation 1/√2; τ = (2/π)·asin(1/√2) = 0.5). Above that floor, the rank τ tracks how well the full-data ranking
# orders the true one: on simulated normal per-example scores (8 checkpoints, 200 examples, 20 seeds;
# tests/detect/test_eval_stability.py) a rank τ of 0.60 went with a τ of 0.51 against the true ranking (one
# checkpoint pair in four misordered), 0.73 with 0.75 (one in eight). Below 0.7 "checkpoint A beats B on this eval"
# is wrong too often to choose a checkpoint by.
NOISY_RANK_TAU = 0.7
NOISE_FLOOR_RANK_TAU = 0.5  # the rank τ of checkpoints that do not differ


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of two equally long sequences, ties handled; in [−1, 1].

    Use it to ask whether two orderings agree: checkpoint order against an eval's values (monotonicity), or one
    ranking of checkpoints against another (stability under resampling).

    Args:
        x: Numbers.
        y: Numbers, as many as ``x``.

    Returns:
        τ-b; NaN when it is undefined: fewer than 2 items, a NaN in either sequence, or one sequence entirely tied
        (no pair it orders) — as ``scipy.stats.kendalltau`` answers.

    Raises:
        ValueError: The sequences differ in length.

    Example:
        >>> kendall_tau_b([1, 2, 3], [10, 20, 30])
        1.0
        >>> kendall_tau_b([1, 2, 3, 4], [1, 2, 2, 3])  # 5 concordant, 1 tie in y: 5 / √(6 · 5)
        0.9128709291752769
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: x has {len(x)} values and y {len(y)}; allowed: sequences of equal length")
    xs, ys = [float(v) for v in x], [float(v) for v in y]
    if len(xs) < 2 or any(math.isnan(v) for v in xs + ys):
        return math.nan
    both = ordered_x = ordered_y = 0
    for i in range(len(xs) - 1):
        xi, yi = xs[i], ys[i]
        for j in range(i + 1, len(xs)):
            sx = (xi > xs[j]) - (xi < xs[j])
            sy = (yi > ys[j]) - (yi < ys[j])
            both += sx * sy
            ordered_x += sx * sx
            ordered_y += sy * sy
    if ordered_x == 0 or ordered_y == 0:
        return math.nan
    return max(-1.0, min(1.0, both / math.sqrt(ordered_x * ordered_y)))


__all__ = ["NOISE_FLOOR_RANK_TAU", "NOISY_RANK_TAU", "kendall_tau_b"]
