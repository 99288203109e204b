"""Sweep figures as PNG files: final loss vs LR (the shape of Wortsman et al.'s figure 1), max attention logit vs
LR, the router's z and load imbalance vs LR (MoE recipes), and the scaling view. (`keel report SWEEP_DIR` draws
the same figures itself, from the sweep store.)

Needs matplotlib (``pip install keel[plot]``), imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keel.proxy.sweep.scaling import ScalingView
from keel.proxy.sweep.summary import CurveSummary

FIGURES = ("loss_vs_lr", "max_logit_vs_lr", "router_vs_lr", "scaling")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("sweep plots need matplotlib: pip install 'keel[plot]'") from exc
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _panels(plt: Any, n: int, height: float = 3.4) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, height), squeeze=False, sharey=True)
    return fig, list(axes[0])


def _size_colors(curves: Sequence[CurveSummary]) -> dict[str, Any]:
    import matplotlib

    sizes = list(dict.fromkeys(c.size for c in curves))
    cmap = matplotlib.colormaps["viridis"]
    return {s: cmap(0.15 + 0.7 * i / max(1, len(sizes) - 1)) for i, s in enumerate(sizes)}


def plot_loss_vs_lr(curves: Sequence[CurveSummary]) -> Any:
    """Final validation loss vs peak LR, one panel per recipe, one line per model size (LRS in the legend).

    Diverged runs are drawn at the loss at initialisation ℓ₀ (dotted line), as LR sensitivity counts them.
    """
    plt = _pyplot()
    recipes = list(dict.fromkeys(c.recipe for c in curves))
    fig, axes = _panels(plt, len(recipes))
    colors = _size_colors(curves)
    for ax, recipe in zip(axes, recipes, strict=True):
        for c in (c for c in curves if c.recipe == recipe):
            s = c.sensitivity
            ax.plot(s.lrs, s.losses, "o-", color=colors[c.size], label=f"{c.size}  LRS {s.lr_sensitivity:.3f}")
            ax.axhline(s.init_loss, color=colors[c.size], ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(recipe)
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    # The panels share y; keep it on the curves (the ℓ₀ lines show only when a run reached the cap).
    low = min(min(c.sensitivity.losses) for c in curves)
    high = max(max(c.sensitivity.losses) for c in curves)
    axes[0].set_ylim(low - 0.05 * (high - low) - 0.02, high + 0.08 * (high - low) + 0.02)
    axes[0].set_ylabel("final validation loss (nats)\n(diverged runs at ℓ₀, dotted)")
    fig.tight_layout()
    return fig


def plot_max_logit_vs_lr(curves: Sequence[CurveSummary]) -> Any:
    """End-of-run max attention logit vs peak LR (log-log), one panel per recipe, one line per size."""
    plt = _pyplot()
    recipes = list(dict.fromkeys(c.recipe for c in curves))
    fig, axes = _panels(plt, len(recipes))
    colors = _size_colors(curves)
    for ax, recipe in zip(axes, recipes, strict=True):
        for c in (c for c in curves if c.recipe == recipe):
            ax.plot(
                c.sensitivity.lrs,
                [v if v > 0 else math.nan for v in c.max_attn_logit],
                "o-",
                color=colors[c.size],
                label=c.size,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(recipe)
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("max attention logit (end of run)")
    fig.tight_layout()
    return fig


def plot_router_vs_lr(curves: Sequence[CurveSummary]) -> Any:
    """End-of-run router z (log) and load imbalance vs peak LR: one line per recipe (and size) with an MoE model,
    one color per recipe, so the recipes compare on one axis. Curves without a router are left out.

    Raises:
        ValueError: No curve has a router (`CurveSummary.has_router`): there is nothing to draw.
    """
    routed = [c for c in curves if c.has_router]
    if not routed:
        raise ValueError("no curve of this sweep has a router (an MoE model); allowed: curves with router values")
    plt = _pyplot()
    fig, (ax_z, ax_load) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    cmap = plt.get_cmap("tab10")
    recipes = list(dict.fromkeys(c.recipe for c in routed))
    sizes = list(dict.fromkeys(c.size for c in routed))
    styles = ("o-", "s--", "^:", "d-.")
    for c in routed:
        color = cmap(recipes.index(c.recipe) % 10)
        style = styles[sizes.index(c.size) % len(styles)]
        label = c.recipe if len(sizes) == 1 else f"{c.recipe} {c.size}"
        lrs = c.sensitivity.lrs
        ax_z.plot(lrs, [v if v > 0 else math.nan for v in c.router_z], style, color=color, label=label)
        ax_load.plot(lrs, c.load_imbalance, style, color=color, label=label)
    ax_z.set_yscale("log")
    ax_z.set_ylabel("router z (end of run)")
    ax_load.axhline(1.0, color="k", ls=":", lw=0.8, label="balanced")
    ax_load.set_ylabel("load imbalance, max/mean (end of run)")
    for ax in (ax_z, ax_load):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_scaling(views: Sequence[ScalingView]) -> Any:
    """Max attention logit and gradient norm vs non-embedding parameters at the fixed LR, with the fitted
    power laws extrapolated to the predicted divergence size (dashed) and the threshold (dotted)."""
    plt = _pyplot()
    from matplotlib import ticker

    fig, (ax_logit, ax_grad) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    cmap = plt.get_cmap("tab10")
    far = [v.predicted_divergence_params for v in views if math.isfinite(v.predicted_divergence_params)]
    for i, v in enumerate(views):
        if not v.sizes:
            continue
        color = cmap(i % 10)
        ax_logit.plot(v.n_params, v.max_attn_logit, "o", color=color, label=v.recipe)
        ax_grad.plot(v.n_params, v.grad_norm, "o", color=color, label=v.recipe)
        lo = min(v.n_params)
        hi = max([max(v.n_params) * 4, *[p for p in far if p < max(v.n_params) * 1e4]])
        xs = [lo * (hi / lo) ** (k / 40) for k in range(41)]
        for ax, fit in ((ax_logit, v.logit_fit), (ax_grad, v.grad_norm_fit)):
            if fit is not None:
                ax.plot(
                    xs,
                    [fit.predict(x) for x in xs],
                    "--",
                    color=color,
                    lw=0.9,
                    label=f"{v.recipe} ∝ N^{fit.exponent:.2f}",
                )
    thresholds = {v.divergence_logit for v in views if math.isfinite(v.divergence_logit)}
    for t in thresholds:
        ax_logit.axhline(t, color="k", ls=":", lw=0.8, label=f"divergence logit {t:.3g}")
    lr = views[0].lr if views else math.nan
    for ax, label in ((ax_logit, "max attention logit"), (ax_grad, "gradient norm")):
        ax.set_xscale("log")
        # A log axis with no positive value (runs that logged no gradient norm) fails the whole figure in
        # matplotlib ("Data cannot be log-scaled"); such an axis stays linear and shows only its legend.
        if any(y > 0 for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)):
            ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel(f"{label} at lr {lr:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        # Under one decade matplotlib labels the minor ticks too (2×10⁵, 3×10⁵ …), and they overlap.
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    fig.tight_layout()
    return fig


def write_plots(
    curves: Sequence[CurveSummary],
    views: Sequence[ScalingView],
    out_dir: str | Path,
) -> list[Path]:
    """Write ``loss_vs_lr.png``, ``max_logit_vs_lr.png``, ``router_vs_lr.png`` (when a curve has a router) and
    ``scaling.png`` (when the view has two sizes) into ``out_dir``; return the paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in _figures(curves, views):
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _figures(curves: Sequence[CurveSummary], views: Sequence[ScalingView]) -> list[tuple[str, Any]]:
    figures = []
    if curves:
        figures += [
            ("loss_vs_lr", plot_loss_vs_lr(curves)),
            ("max_logit_vs_lr", plot_max_logit_vs_lr(curves)),
        ]
    if any(c.has_router for c in curves):
        figures.append(("router_vs_lr", plot_router_vs_lr(curves)))
    if any(len(v.sizes) >= 2 for v in views):
        figures.append(("scaling", plot_scaling(views)))
    return figures
