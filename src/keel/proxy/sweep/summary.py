"""Summarise a sweep store: one LR-sensitivity curve per (recipe, size), the scaling view, tables and JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from keel.proxy.model import list_proxy_sizes
from keel.proxy.sweep.metrics import LRSensitivity, lr_sensitivity
from keel.proxy.sweep.scaling import ScalingView, calibrate_divergence_logit, scaling_view

# ℓ₀ when no run of a curve measured its initial loss: a uniform prediction over the 256 byte values.
UNIFORM_BYTE_LOSS = math.log(256)
# The fixed LR of the scaling view when the sweep has no baseline to take it from.
DEFAULT_SCALING_LR = 1e-2
# Beyond this a power law fitted through a few proxy sizes says "flat", not where it would diverge.
FAR_PARAMS = 1e13


@dataclass(frozen=True)
class CurveSummary:
    """One recipe at one size: its loss-vs-LR curve, LR sensitivity and end-of-run signals per LR.

    Attributes:
        recipe: Recipe name.
        size: Proxy size.
        n_params: Non-embedding parameters.
        sensitivity: `LRSensitivity` of the curve (seed-averaged, capped validation losses).
        max_attn_logit: End-of-run max attention logit per LR (mean over seeds), in ``sensitivity.lrs`` order.
        log_z: End-of-run mean log Z per LR.
        grad_norm: End-of-run gradient norm per LR.
        router_z: End-of-run router z per LR (the unscaled router z-loss, max over MoE layers); NaN for a dense
            model, as the two below.
        load_imbalance: End-of-run load imbalance per LR (max/mean tokens per expert; 1 balanced, E/k collapsed).
        dead_experts: End-of-run number of experts that received no token, per LR.
        runs: Finished runs in the curve.
        diverged: Runs that diverged (capped at ℓ₀).
        errors: Runs that raised (left out of the curve).
    """

    recipe: str
    size: str
    n_params: int
    sensitivity: LRSensitivity
    max_attn_logit: tuple[float, ...]
    log_z: tuple[float, ...]
    grad_norm: tuple[float, ...]
    router_z: tuple[float, ...]
    load_imbalance: tuple[float, ...]
    dead_experts: tuple[float, ...]
    runs: int
    diverged: int
    errors: int

    @property
    def all_at_init(self) -> bool:
        """Whether every LR ended at or above ℓ₀ (diverged, or no better than the initial model): the curve's
        LRS is then 0, a flag and not the best result (`keel.proxy.sweep.metrics`)."""
        return self.sensitivity.best_loss >= self.sensitivity.init_loss

    @property
    def has_router(self) -> bool:
        """Whether any run of the curve measured a router (an MoE model): the router table and plot show it."""
        return any(math.isfinite(v) for v in (*self.router_z, *self.load_imbalance, *self.dead_experts))


# The router's end signals a `CurveSummary` carries per LR, as `RunResult` and the sweep store name them.
ROUTER_FIELDS = ("router_z", "load_imbalance", "dead_experts")


def summarize(rows: Sequence[dict[str, Any]]) -> list[CurveSummary]:
    """A `CurveSummary` per (recipe, size) with at least one finished, non-error run; recipes in the order
    they first appear, sizes smallest first."""
    curves = []
    for recipe in _ordered(r["recipe"] for r in rows):
        for size in _sizes(rows):
            mine = [r for r in rows if r["recipe"] == recipe and r["size"] == size]
            usable = [r for r in mine if r["status"] in ("done", "diverged")]
            if not usable:
                continue
            lrs = sorted({r["lr"] for r in usable})
            by_lr = [[r for r in usable if r["lr"] == lr] for lr in lrs]
            init = [r["init_loss"] for r in usable if math.isfinite(r["init_loss"])]
            init_loss = float(np.median(init)) if init else UNIFORM_BYTE_LOSS
            sens = lr_sensitivity(lrs, [[r["val_loss"] for r in group] for group in by_lr], init_loss)
            curves.append(
                CurveSummary(
                    recipe=recipe,
                    size=size,
                    n_params=int(usable[0]["n_params"] or 0),
                    sensitivity=sens,
                    max_attn_logit=tuple(_mean(g, "max_attn_logit") for g in by_lr),
                    log_z=tuple(_mean(g, "log_z") for g in by_lr),
                    grad_norm=tuple(_mean(g, "grad_norm") for g in by_lr),
                    **{name: tuple(_mean(g, name) for g in by_lr) for name in ROUTER_FIELDS},
                    runs=len(usable),
                    diverged=sum(r["status"] == "diverged" for r in usable),
                    errors=sum(r["status"] == "error" for r in mine),
                )
            )
    return curves


def scaling_views(
    rows: Sequence[dict[str, Any]],
    curves: Sequence[CurveSummary],
    *,
    lr: float | None = None,
    divergence_logit: float | None = None,
) -> list[ScalingView]:
    """The scaling view of every recipe at one fixed LR: the grid LR nearest ``lr`` in log space.

    By default the fixed LR is the baseline's best LR at the smallest size: an LR at which the small model
    trains well, so the view asks at which size the baseline stops doing so there. Without a baseline
    curve it is the grid LR nearest 1e-2. The divergence threshold is ``divergence_logit`` when given,
    else calibrated on the baseline's runs (or, without a baseline, on each recipe's own), see
    `calibrate_divergence_logit`.
    """
    lrs = sorted({r["lr"] for r in rows})
    if not lrs:
        return []
    sizes = _sizes(rows)
    recipes = _ordered(r["recipe"] for r in rows)
    reference = "baseline" if "baseline" in recipes else None
    if lr is None:
        smallest = [c for c in curves if c.recipe == reference and c.size == sizes[0]]
        lr = smallest[0].sensitivity.best_lr if smallest else DEFAULT_SCALING_LR
    fixed = min(lrs, key=lambda x: abs(math.log(x / lr)))
    views = []
    for recipe in recipes:
        threshold, source = divergence_logit, "given"
        if threshold is None:
            calibrate_on = reference or recipe
            threshold = calibrate_divergence_logit(
                [r for r in rows if r["recipe"] == calibrate_on],
                [c for c in curves if c.recipe == calibrate_on],
            )
            source = f"calibrated on {calibrate_on}"
        views.append(
            scaling_view(
                rows,
                recipe=recipe,
                lr=fixed,
                size_order=sizes,
                divergence_logit=threshold,
                threshold_source=source,
            )
        )
    return views


def sensitivity_ratios(curves: Sequence[CurveSummary], reference: str = "baseline") -> dict[tuple[str, str], float]:
    """LRS(reference) / LRS(recipe) per (recipe, size): how many times less LR-sensitive each recipe is.

    Only curves that compare: none for a curve whose every LR ended at ℓ₀ (`CurveSummary.all_at_init`: its LRS 0
    would read as infinitely stable) or the reference's such curve, and none over another LR grid than the
    reference's (a recipe whose runs raised at some LRs has them left out of its curve, and the mean over the
    LRs that remain is not the same quantity), nor for a curve of one LR (a sweep killed after its first run).
    """
    refs = {c.size: c for c in curves if c.recipe == reference}
    out = {}
    for c in curves:
        ref = refs.get(c.size)
        if ref is None or ref.all_at_init or c.all_at_init or ref.sensitivity.lrs != c.sensitivity.lrs:
            continue
        if len(c.sensitivity.lrs) < 2:  # one LR (a sweep killed early): its LRS is 0 by construction
            continue
        mine = c.sensitivity.lr_sensitivity
        out[(c.recipe, c.size)] = ref.sensitivity.lr_sensitivity / mine if mine > 0 else math.inf
    return out


def to_json(
    curves: Sequence[CurveSummary],
    views: Sequence[ScalingView],
    rows: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The ``keel sweep --json`` document: ``recipes`` (one entry per recipe and size), ``scaling``,
    ``runs`` (counts by status)."""
    ratios = sensitivity_ratios(curves)
    recipes = [
        {
            "name": c.recipe,
            "size": c.size,
            "n_params": c.n_params,
            "lr_sensitivity": c.sensitivity.lr_sensitivity,
            "all_at_init": c.all_at_init,
            "best_lr": c.sensitivity.best_lr,
            "best_loss": c.sensitivity.best_loss,
            "init_loss": c.sensitivity.init_loss,
            "lr_range": list(c.sensitivity.lr_range),
            "sensitivity_vs_baseline": _num(ratios.get((c.recipe, c.size))),
            "lrs": list(c.sensitivity.lrs),
            "losses": list(c.sensitivity.losses),
            "max_attn_logit": [_num(v) for v in c.max_attn_logit],
            "log_z": [_num(v) for v in c.log_z],
            "grad_norm": [_num(v) for v in c.grad_norm],
            **{name: [_num(v) for v in getattr(c, name)] for name in ROUTER_FIELDS},
            "runs": c.runs,
            "diverged": c.diverged,
            "errors": c.errors,
        }
        for c in curves
    ]
    scaling = [
        {
            "recipe": v.recipe,
            "lr": v.lr,
            "sizes": list(v.sizes),
            "n_params": list(v.n_params),
            "max_attn_logit": [_num(x) for x in v.max_attn_logit],
            "grad_norm": [_num(x) for x in v.grad_norm],
            "logit_exponent": _num(v.logit_fit.exponent if v.logit_fit else None),
            "grad_norm_exponent": _num(v.grad_norm_fit.exponent if v.grad_norm_fit else None),
            "logit_log10_prefactor": _num(v.logit_fit.log10_prefactor if v.logit_fit else None),
            "grad_norm_log10_prefactor": _num(v.grad_norm_fit.log10_prefactor if v.grad_norm_fit else None),
            "divergence_logit": _num(v.divergence_logit),
            "threshold_source": v.threshold_source,
            "predicted_divergence_params": _num(v.predicted_divergence_params),
            "reach": reach(v),
        }
        for v in views
    ]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"recipes": recipes, "scaling": scaling, "runs": statuses}


def format_tables(curves: Sequence[CurveSummary], views: Sequence[ScalingView]) -> str:
    """Plain-text tables: one per recipe (a row per size), the router's end signals when a curve has an MoE
    model, then the scaling view."""
    ratios = sensitivity_ratios(curves)
    lines = []
    for recipe in _ordered(c.recipe for c in curves):
        lines.append(f"\n{recipe}")
        lines.append(
            f"  {'size':<7}{'params':>9}{'LRS':>8}{'vs base':>9}{'best lr':>9}{'best loss':>10}"
            f"{'lr range (±0.1 nat)':>22}{'max attn logit (lo→hi lr)':>30}{'diverged':>10}{'errors':>8}"
        )
        for c in (c for c in curves if c.recipe == recipe):
            s = c.sensitivity
            ratio = ratios.get((c.recipe, c.size))
            logits = f"{_g(c.max_attn_logit[0])} → {_g(max(c.max_attn_logit, key=_key))}"
            # every LR at ℓ₀: no LR is best, and none is "near the best" (the LRS of 0 is a flag, not a result)
            best_lr, lr_range = (
                ("—", "—") if c.all_at_init else (f"{s.best_lr:.0e}", f"{s.lr_range[0]:.0e} … {s.lr_range[1]:.0e}")
            )
            lines.append(
                f"  {c.size:<7}{c.n_params:>9}{('—' if c.all_at_init else f'{s.lr_sensitivity:.3f}'):>8}"
                f"{(f'{ratio:.1f}x' if ratio is not None else '—'):>9}{best_lr:>9}{s.best_loss:>10.3f}"
                f"{lr_range:>22}{logits:>30}"
                f"{c.diverged:>10}{c.errors:>8}"
            )
    lines += _router_table(curves)
    if views:
        lines.append(f"\nscaling at lr {views[0].lr:g}: end-of-run max attention logit and gradient norm by size")
        for v in views:
            cells = "  ".join(
                f"{s}: {_g(a)} / {_g(g)}" for s, a, g in zip(v.sizes, v.max_attn_logit, v.grad_norm, strict=True)
            )
            growth = f"logit ∝ N^{v.logit_fit.exponent:.2f}" if v.logit_fit else "logit: < 2 sizes"
            lines.append(f"  {v.recipe:<16}{cells}   {growth}; {reach(v)}")
    return "\n".join(lines).lstrip("\n")


def _router_table(curves: Sequence[CurveSummary]) -> list[str]:
    """The router's end signals per LR, one row per curve with an MoE model; nothing when no curve has one."""
    routed = [c for c in curves if c.has_router]
    if not routed:
        return []
    lrs = sorted({lr for c in routed for lr in c.sensitivity.lrs})
    name_width = max(len("recipe"), *(len(c.recipe) for c in routed)) + 2
    lines = [
        "\nrouter at the end of the run (mean over seeds): router z / load imbalance (1 balanced, E/k collapsed) / "
        "dead experts",
        f"  {'recipe':<{name_width}}{'size':<7}" + "".join(f"{f'lr {lr:.0e}':>20}" for lr in lrs),
    ]
    for c in routed:
        cells = dict(
            zip(c.sensitivity.lrs, zip(c.router_z, c.load_imbalance, c.dead_experts, strict=True), strict=True)
        )
        row = "".join(f"{' / '.join(_g(v) for v in cells[lr]) if lr in cells else '—':>20}" for lr in lrs)
        lines.append(f"  {c.recipe:<{name_width}}{c.size:<7}{row}")
    return lines


def reach(view: ScalingView) -> str:
    """Where the view's logit fit reaches its divergence threshold, in words (the table's and the report's)."""
    predicted = view.predicted_divergence_params
    if math.isnan(view.divergence_logit):
        return (
            "no divergence threshold: no run above its curve's best LR ended worse than the best, to calibrate one "
            "on (give one with --divergence-logit)"
        )
    target = f"{_g(view.divergence_logit)} ({view.threshold_source})"
    if predicted == math.inf:
        return f"no growth: never reaches {target}"
    if math.isnan(predicted):
        return f"reaches {target} at —"
    if predicted < FAR_PARAMS:
        return f"reaches {target} at ≈{predicted:.2g} params"
    return f"practically flat: reaches {target} only at ≈{predicted:.1g} params"


def _sizes(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["size"] for r in rows}
    return [s for s in list_proxy_sizes() if s in present]


def _ordered(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def _mean(group: list[dict[str, Any]], key: str) -> float:
    # .get: rows a caller built by hand without the router's columns count as a dense model's
    finite = [r[key] for r in group if math.isfinite(r.get(key, math.nan))]
    return float(np.mean(finite)) if finite else math.nan


def _num(value: float | None) -> float | None:
    # JSON has no NaN or Infinity; null stands for "not measured", a huge number would mislead.
    return None if value is None or not math.isfinite(value) else float(value)


def _g(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3g}"


def _key(value: float) -> float:
    return value if math.isfinite(value) else -math.inf
