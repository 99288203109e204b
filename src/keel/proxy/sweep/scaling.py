"""The scaling view: how a signal at a fixed LR grows with model size, and at what size it reaches a limit.

Wortsman et al. (2023) show that the instabilities they study can be predicted before they appear: at a
fixed learning rate the max attention logit (and other signals) grow with model size, so extrapolating
their trend over small models says at which size the baseline would diverge. keel fits a power law

    log10 signal = a + b · log10 N        (N = non-embedding parameters)

by least squares over the sizes of the sweep, and solves it for the size at which the signal reaches a
threshold. For the max attention logit the threshold is, by default, *calibrated on the sweep itself*:
the smallest end-of-run max logit among the recipe's runs whose final loss ended more than 0.1 nats
above the best loss of their curve at an LR above the best LR — the logit size at which this proxy's loss
already suffered. A fit through two or three small sizes is a rough guide, not a forecast; the result
says how many points it rests on.

References:
    Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities",
    arXiv 2309.14322 (no official code): predicting attention-logit growth from its trend over model scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    """``signal ≈ 10^a · N^b`` over the measured points.

    Attributes:
        exponent: b, the growth exponent.
        log10_prefactor: a.
        n_points: Points the fit rests on.
    """

    exponent: float
    log10_prefactor: float
    n_points: int

    def predict(self, n_params: float) -> float:
        """The fitted signal at ``n_params``."""
        return 10 ** (self.log10_prefactor + self.exponent * math.log10(n_params))

    def solve(self, value: float) -> float:
        """The size at which the fit reaches ``value``; ``inf`` when the signal does not grow with size."""
        if not self.exponent > 0:
            return math.inf
        log_n = (math.log10(value) - self.log10_prefactor) / self.exponent
        return 10**log_n if log_n < 300 else math.inf  # a flat fit (exponent ~1e-17) never gets there


def fit_power_law(n_params: Sequence[float], values: Sequence[float]) -> PowerLawFit:
    """Least-squares line through (log10 N, log10 value); non-positive or non-finite points are dropped.

    Raises:
        ValueError: Fewer than two usable points at distinct sizes.

    Example:
        >>> fit = fit_power_law([1e3, 1e4, 1e5], [2.0, 20.0, 200.0])
        >>> round(fit.exponent, 6), round(fit.solve(2000.0))
        (1.0, 1000000)
    """
    n = np.asarray(n_params, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(n) & np.isfinite(v) & (n > 0) & (v > 0)
    n, v = n[keep], v[keep]
    if len(np.unique(n)) < 2:
        raise ValueError(
            f"fit_power_law: {len(np.unique(n))} usable sizes; allowed: at least two distinct "
            "sizes with finite positive values"
        )
    slope, intercept = np.polyfit(np.log10(n), np.log10(v), 1)
    return PowerLawFit(exponent=float(slope), log10_prefactor=float(intercept), n_points=int(n.size))


@dataclass(frozen=True)
class ScalingView:
    """One recipe's signals at one LR across model sizes, and the size its attention logit would reach the
    divergence threshold.

    Attributes:
        recipe: Recipe name.
        lr: The fixed learning rate.
        sizes: Proxy size names, smallest first.
        n_params: Non-embedding parameters per size.
        max_attn_logit: End-of-run max attention logit per size (mean over seeds).
        grad_norm: End-of-run gradient norm per size (mean over seeds).
        logit_fit: Power law of the max attention logit over size (``None`` with < 2 sizes).
        grad_norm_fit: Power law of the gradient norm over size.
        divergence_logit: The threshold the logit fit is solved for.
        threshold_source: ``"calibrated"`` (from the sweep's degraded runs) or ``"given"``.
        predicted_divergence_params: Non-embedding parameters at which the fitted logit reaches the threshold
            (``inf``: the logit does not grow with size; ``nan``: no fit).
    """

    recipe: str
    lr: float
    sizes: tuple[str, ...]
    n_params: tuple[int, ...]
    max_attn_logit: tuple[float, ...]
    grad_norm: tuple[float, ...]
    logit_fit: PowerLawFit | None
    grad_norm_fit: PowerLawFit | None
    divergence_logit: float
    threshold_source: str
    predicted_divergence_params: float


def calibrate_divergence_logit(rows: Sequence[dict[str, Any]], curves: Sequence[Any]) -> float | None:
    """The smallest end max-logit among runs that ended > tolerance above their curve's best loss at an LR
    above its best LR; ``None`` when no run did.

    Args:
        rows: Sweep-store rows of one recipe.
        curves: That recipe's `CurveSummary` objects (one per size), giving each curve's best LR and loss.
    """
    found = []
    for curve in curves:
        s = curve.sensitivity
        for row in rows:
            if row["size"] != curve.size or row["status"] == "error" or row["lr"] <= s.best_lr:
                continue
            loss = row["val_loss"] if math.isfinite(row["val_loss"]) else s.init_loss
            if min(loss, s.init_loss) > s.best_loss + s.tolerance and math.isfinite(row["max_attn_logit"]):
                found.append(row["max_attn_logit"])
    return min(found) if found else None


def scaling_view(
    rows: Sequence[dict[str, Any]],
    *,
    recipe: str,
    lr: float,
    size_order: Sequence[str],
    divergence_logit: float | None,
    threshold_source: str,
) -> ScalingView:
    """Build a `ScalingView` from sweep-store rows (the recipe's finished runs at ``lr``)."""
    sizes, n_params, logits, grads = [], [], [], []
    for size in size_order:
        runs = [
            r
            for r in rows
            if r["recipe"] == recipe
            and r["size"] == size
            and math.isclose(r["lr"], lr)
            and r["status"] in ("done", "diverged")
        ]
        if not runs:
            continue
        sizes.append(size)
        n_params.append(int(runs[0]["n_params"]))
        logits.append(_mean([r["max_attn_logit"] for r in runs]))
        grads.append(_mean([r["grad_norm"] for r in runs]))
    logit_fit = _try_fit(n_params, logits)
    grad_fit = _try_fit(n_params, grads)
    threshold = math.nan if divergence_logit is None else divergence_logit
    predicted = logit_fit.solve(threshold) if logit_fit is not None and math.isfinite(threshold) else math.nan
    return ScalingView(
        recipe=recipe,
        lr=lr,
        sizes=tuple(sizes),
        n_params=tuple(n_params),
        max_attn_logit=tuple(logits),
        grad_norm=tuple(grads),
        logit_fit=logit_fit,
        grad_norm_fit=grad_fit,
        divergence_logit=threshold,
        threshold_source=threshold_source,
        predicted_divergence_params=predicted,
    )


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _try_fit(n_params: list[int], values: list[float]) -> PowerLawFit | None:
    try:
        return fit_power_law(n_params, values)
    except ValueError:
        return None
