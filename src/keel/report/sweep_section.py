"""A sweep's section of the page: its LR-sensitivity tables, the router's end signals (MoE recipes), the scaling
view, its runs, and the figure specs that `report.js` draws with plotly (final loss vs LR and max attention logit
vs LR per recipe, one line per size; router z and load imbalance vs LR, one line per MoE curve; the scaling view's
signals vs model size with their power-law fits), the figures of Wortsman et al. (2023).

Every value comes from the sweep store and goes through `esc` (tables) or as JSON data (figures).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from keel.report.sections import MAX_ROWS, esc, meta_details, problems
from keel.report.sweep_data import Curve, Scaling, SweepData

# Sizes along viridis (the sweep's PNG figures use the same map); recipes in plotly's default order.
SIZE_COLORS = ("#482878", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b")
RECIPE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
FIT_POINTS = 41


def sweep_section(sweep: SweepData, index: int) -> tuple[str, list[dict[str, Any]]]:
    """The section's HTML and the specs of its figures (``{id, title, x_title, y_title, log_x, log_y, y_range,
    traces}``, drawn by `report.js`); ``index`` keeps the figure ids of several sweeps apart."""
    figures = _figures(sweep, f"sweep{index}")
    parts = [
        f"<section class='sweep'><h2>LR sensitivity sweep: {esc(sweep.name)}</h2>",
        f"<div class='path'>{esc(sweep.path)}</div>",
        meta_details(sweep.name, sweep.meta),
        problems(sweep.problems),
        *[_recipe_table(sweep.curves, recipe) for recipe in _ordered(c.recipe for c in sweep.curves)],
        _router_table(sweep.curves),
        _scaling_table(sweep.scaling),
        "<div class='figs'>"
        + "".join(
            f"<div class='chart fig' id='{f['id']}' role='figure' aria-label='chart: {esc(f['title'])}'></div>"
            for f in figures
        )
        + "</div>",
        _runs_table(sweep.rows),
        "</section>",
    ]
    return "\n".join(p for p in parts if p), figures


def _recipe_table(curves: Sequence[Curve], recipe: str) -> str:
    head = (
        "<tr><th>size</th><th>params</th><th>LRS</th><th>vs base</th><th>best lr</th><th>best loss</th>"
        "<th>lr range (±0.1 nat)</th><th>max attn logit (lo→hi lr)</th><th>diverged</th><th>errors</th></tr>"
    )
    rows = []
    for c in (c for c in curves if c.recipe == recipe):
        logits = [v for v in c.max_attn_logit if v is not None]
        span = f"{_g(c.max_attn_logit[0])} → {_g(max(logits) if logits else None)}" if c.max_attn_logit else "—"
        ratio = "—" if c.vs_baseline is None else f"{c.vs_baseline:.1f}x"
        at_init = _all_at_init(c)  # every LR at ℓ₀: LRS 0 is a flag, and no LR is best or near the best
        cells = (
            c.size,
            c.n_params,
            "—" if at_init else f"{c.lr_sensitivity:.3f}",
            ratio,
            "—" if at_init else f"{c.best_lr:.0e}",
            f"{c.best_loss:.3f}",
            "—" if at_init else f"{c.lr_range[0]:.0e} … {c.lr_range[1]:.0e}",
            span,
            c.diverged,
            c.errors,
        )
        rows.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in cells) + "</tr>")
    return f"<h3>{esc(recipe)}</h3><table class='sweep num'>{head}{''.join(rows)}</table>"


def _all_at_init(curve: Curve) -> bool:
    """Whether every LR of ``curve`` ended at or above ℓ₀ (the sweep's `CurveSummary.all_at_init`)."""
    return curve.best_loss >= curve.init_loss


def _router_table(curves: Sequence[Curve]) -> str:
    """Router z / load imbalance / dead experts per LR, one row per curve with router values; empty when none has."""
    routed = [c for c in curves if c.has_router]
    if not routed:
        return ""
    lrs = sorted({lr for c in routed for lr in c.lrs})
    head = "<tr><th>recipe</th><th>size</th>" + "".join(f"<th>lr {lr:.0e}</th>" for lr in lrs) + "</tr>"
    rows = []
    for c in routed:
        at = dict(zip(c.lrs, zip(c.router_z, c.load_imbalance, c.dead_experts, strict=True), strict=True))
        cells = (c.recipe, c.size, *(" / ".join(map(_g, at[lr])) if lr in at else "—" for lr in lrs))
        rows.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in cells) + "</tr>")
    return (
        "<h3>Router at the end of the run (mean over seeds): router z / load imbalance (1 balanced, E/k collapsed)"
        f" / dead experts</h3><table class='sweep num'>{head}{''.join(rows)}</table>"
    )


def _scaling_table(views: Sequence[Scaling]) -> str:
    if not views:
        return ""
    rows = "".join(
        f"<tr><td>{esc(v.recipe)}</td><td>{esc(v.lr)}</td><td>"
        + "<br>".join(
            f"{esc(s)}: {esc(_g(a))} / {esc(_g(g))}"
            for s, a, g in zip(v.sizes, v.max_attn_logit, v.grad_norm, strict=True)
        )
        + f"</td><td>{esc(v.growth)}</td><td>{esc(v.reach)}</td></tr>"
        for v in views
    )
    return (
        "<h3>Scaling: end-of-run max attention logit and gradient norm by size, at one LR</h3>"
        "<table class='sweep'><tr><th>recipe</th><th>lr</th><th>size: max logit / grad norm</th>"
        f"<th>growth</th><th>divergence</th></tr>{rows}</table>"
    )


def _runs_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    counts = Counter(str(r["status"]) for r in rows)
    head = (
        "<tr><th>run</th><th>status</th><th>lr</th><th>seed</th><th>val loss</th><th>max attn logit</th>"
        "<th>steps</th><th>wall s</th><th>error</th></tr>"
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(v)}</td>"
            for v in (
                r["run_id"],
                r["status"],
                f"{r['lr']:.3g}",
                r["seed"],
                _g(r["val_loss"]),
                _g(r["max_attn_logit"]),
                "" if r["steps_done"] is None else r["steps_done"],
                _g(r["wall_s"]),
                _last_line(r["error"]),
            )
        )
        + "</tr>"
        for r in rows[:MAX_ROWS]
    )
    more = f"<p class='muted'>… and {len(rows) - MAX_ROWS} more.</p>" if len(rows) > MAX_ROWS else ""
    summary = f"{len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.most_common())
    return f"<details><summary>{esc(summary)}</summary><table class='sweep'>{head}{body}</table>{more}</details>"


# ---- figures -------------------------------------------------------------------------------------------------


def _figures(sweep: SweepData, prefix: str) -> list[dict[str, Any]]:
    curves, views = sweep.curves, sweep.scaling
    recipes = _ordered(c.recipe for c in curves)
    sizes = _ordered(c.size for c in curves)
    color = {s: SIZE_COLORS[i % len(SIZE_COLORS)] for i, s in enumerate(sizes)}
    figures = []
    # The loss panels share one y range on the curves (an ℓ₀ line shows only when a run reached the cap).
    losses = [x for c in curves for x in c.losses]
    low, high = (min(losses), max(losses)) if losses else (0.0, 1.0)
    y_range = [low - 0.05 * (high - low) - 0.02, high + 0.08 * (high - low) + 0.02]
    for recipe in recipes:
        mine = [c for c in curves if c.recipe == recipe]
        traces = []
        for c in mine:
            sensitivity = "—" if _all_at_init(c) else f"{c.lr_sensitivity:.3f}"
            traces.append(_trace(f"{c.size}  LRS {sensitivity}", c.lrs, c.losses, color[c.size]))
            traces.append(
                _trace(
                    f"{c.size} ℓ₀ (diverged runs)",
                    [c.lrs[0], c.lrs[-1]],
                    [c.init_loss] * 2,
                    color[c.size],
                    dash="dot",
                    mode="lines",
                    legend=False,
                )
            )
        figures.append(
            _figure(
                f"final loss vs LR: {recipe}", "learning rate", "final validation loss (nats)", traces, y_range=y_range
            )
        )
    for recipe in recipes:
        traces = [
            _trace(c.size, c.lrs, [v if v is not None and v > 0 else None for v in c.max_attn_logit], color[c.size])
            for c in curves
            if c.recipe == recipe
        ]
        figures.append(
            _figure(
                f"max attention logit vs LR: {recipe}",
                "learning rate",
                "max attention logit (end of run)",
                traces,
                log_y=True,
            )
        )
    figures += _router_figures(curves)
    if any(len(v.sizes) >= 2 for v in views):
        figures += _scaling_figures(views)
    for i, figure in enumerate(figures):
        figure["id"] = f"{prefix}-fig{i}"
    return figures


def _router_figures(curves: Sequence[Curve]) -> list[dict[str, Any]]:
    """Router z (log) and load imbalance vs LR, one line per curve with router values, colored by recipe (the
    recipes compare on one axis); none when no curve has a router."""
    routed = [c for c in curves if c.has_router]
    if not routed:
        return []
    recipes = _ordered(c.recipe for c in routed)
    color = {r: RECIPE_COLORS[i % len(RECIPE_COLORS)] for i, r in enumerate(recipes)}
    z = [
        _trace(
            f"{c.recipe} {c.size}", c.lrs, [v if v is not None and v > 0 else None for v in c.router_z], color[c.recipe]
        )
        for c in routed
    ]
    load = [_trace(f"{c.recipe} {c.size}", c.lrs, c.load_imbalance, color[c.recipe]) for c in routed]
    return [
        _figure("router z vs LR", "learning rate", "router z (end of run)", z, log_y=True),
        _figure("load imbalance vs LR", "learning rate", "max/mean tokens per expert (end of run)", load),
    ]


def _scaling_figures(views: Sequence[Scaling]) -> list[dict[str, Any]]:
    """Max attention logit and gradient norm vs parameters at the fixed LR, with the fitted power laws drawn
    out to the predicted divergence size (dashed) and the divergence threshold (dotted)."""
    far = [v.predicted_divergence_params for v in views if v.predicted_divergence_params is not None]
    lr = views[0].lr
    logit, grad = [], []
    for i, v in enumerate(views):
        if not v.sizes:
            continue
        c = RECIPE_COLORS[i % len(RECIPE_COLORS)]
        logit.append(_trace(v.recipe, v.n_params, v.max_attn_logit, c, mode="markers"))
        grad.append(_trace(v.recipe, v.n_params, v.grad_norm, c, mode="markers"))
        lo, top = min(v.n_params), max(v.n_params)
        hi = max([top * 4, *[p for p in far if p < top * 1e4]])
        if lo <= 0 or hi <= lo:
            continue
        xs = [lo * (hi / lo) ** (k / (FIT_POINTS - 1)) for k in range(FIT_POINTS)]
        for traces, fit in ((logit, v.logit_fit), (grad, v.grad_norm_fit)):
            if fit is not None:
                ys = [_power(fit, x) for x in xs]
                traces.append(_trace(f"{v.recipe} ∝ N^{fit[0]:.2f}", xs, ys, c, dash="dash", mode="lines"))
    all_x = [x for t in logit for x in t["x"]]
    for t in sorted({v.divergence_logit for v in views if v.divergence_logit is not None}):
        if all_x:
            logit.append(
                _trace(
                    f"divergence logit {t:.3g}", [min(all_x), max(all_x)], [t, t], "#000000", dash="dot", mode="lines"
                )
            )
    return [
        _figure(
            f"max attention logit vs size at lr {lr:g}",
            "non-embedding parameters",
            "max attention logit",
            logit,
            log_y=True,
            log_x=True,
        ),
        _figure(
            f"gradient norm vs size at lr {lr:g}",
            "non-embedding parameters",
            "gradient norm",
            grad,
            log_y=True,
            log_x=True,
        ),
    ]


def _figure(
    title: str,
    x_title: str,
    y_title: str,
    traces: list[dict[str, Any]],
    *,
    log_x: bool = True,
    log_y: bool = False,
    y_range: list[float] | None = None,
) -> dict[str, Any]:
    if y_range is not None and not all(map(math.isfinite, y_range)):
        y_range = None  # losses near the float limit: plotly's own range
    return {
        "id": "",
        "title": title,
        "x_title": x_title,
        "y_title": y_title,
        "log_x": log_x,
        "log_y": log_y,
        "y_range": y_range,
        "traces": traces,
    }


def _trace(
    name: str,
    x: Sequence[Any],
    y: Sequence[Any],
    color: str,
    *,
    dash: str = "solid",
    mode: str = "lines+markers",
    legend: bool = True,
) -> dict[str, Any]:
    return {
        "name": name,
        "x": [_finite(v) for v in x],
        "y": [_finite(v) for v in y],
        "color": color,
        "dash": dash,
        "mode": mode,
        "legend": legend,
    }


def _power(fit: tuple[float, float], n: float) -> float | None:
    exponent, log10_prefactor = fit
    power = log10_prefactor + exponent * math.log10(n)
    return 10**power if -300 < power < 300 else None


def _finite(value: Any) -> float | None:
    # JSON has no NaN or Infinity: a gap in the line.
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _g(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.3g}"


def _last_line(error: str | None, limit: int = 200) -> str:
    """The last line of a run's error (a traceback ends with the exception's message)."""
    lines = (error or "").strip().splitlines()
    return lines[-1][:limit] if lines else ""


def _ordered(items: Any) -> list[str]:
    return list(dict.fromkeys(items))
