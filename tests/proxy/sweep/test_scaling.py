import math

import pytest

from keel.proxy.sweep import fit_power_law
from keel.proxy.sweep.metrics import lr_sensitivity
from keel.proxy.sweep.scaling import calibrate_divergence_logit, scaling_view
from keel.proxy.sweep.summary import scaling_views, summarize


def test_power_law_fit_recovers_exponent_and_solves_for_a_threshold():
    n = [1e4, 1e5, 1e6]
    fit = fit_power_law(n, [3.0 * x**0.5 for x in n])
    assert fit.exponent == pytest.approx(0.5) and fit.predict(1e8) == pytest.approx(3e4)
    assert fit.solve(3e4) == pytest.approx(1e8) and fit.n_points == 3


def test_no_growth_never_reaches_the_threshold():
    fit = fit_power_law([1e4, 1e5], [20.0, 10.0])
    assert fit.exponent < 0 and fit.solve(1e4) == math.inf


def test_unusable_points_are_dropped_and_too_few_raise():
    fit = fit_power_law([1e3, 1e4, 1e5, 1e6], [10.0, 100.0, float("nan"), -1.0])
    assert fit.n_points == 2 and fit.exponent == pytest.approx(1.0)
    with pytest.raises(ValueError, match="1 usable sizes"):
        fit_power_law([1e3, 1e3], [1.0, 2.0])


def _row(size, lr, val, logit, n, grad=1.0, status="done", recipe="baseline"):
    return dict(
        recipe=recipe,
        size=size,
        lr=lr,
        val_loss=val,
        max_attn_logit=logit,
        grad_norm=grad,
        n_params=n,
        status=status,
        init_loss=5.5,
        log_z=0.0,
    )


class _Curve:
    def __init__(self, size, lrs, losses):
        self.size, self.sensitivity = size, lr_sensitivity(lrs, losses, 5.5)


def test_calibrated_threshold_is_the_smallest_logit_of_a_degraded_high_lr_run():
    rows = [
        _row("tiny", 1e-3, 2.6, 10, 100),
        _row("tiny", 1e-2, 2.3, 40, 100),  # best
        _row("tiny", 3e-2, 2.35, 90, 100),  # within 0.1: not degraded
        _row("tiny", 1e-1, 2.9, 300, 100),
        _row("tiny", 3e-1, float("nan"), 5000, 100, status="diverged"),
    ]
    curve = _Curve("tiny", [r["lr"] for r in rows], [r["val_loss"] for r in rows])
    assert calibrate_divergence_logit(rows, [curve]) == 300
    assert calibrate_divergence_logit(rows[:3], [_Curve("tiny", [1e-3, 1e-2, 3e-2], [2.6, 2.3, 2.35])]) is None


def test_scaling_view_fits_across_sizes_at_the_fixed_lr():
    rows = [
        _row("tiny", 1e-2, 2.5, 10.0, 1_000, grad=0.5),
        _row("small", 1e-2, 2.4, 100.0, 10_000, grad=1.0),
        _row("tiny", 1e-1, 2.9, 1e4, 1_000),
        _row("small", 1e-2, 2.4, 0, 10_000, status="error"),
    ]
    view = scaling_view(
        rows,
        recipe="baseline",
        lr=1e-2,
        size_order=["tiny", "small", "medium"],
        divergence_logit=1e4,
        threshold_source="given",
    )
    assert view.sizes == ("tiny", "small") and view.max_attn_logit == (10.0, 100.0)
    assert view.logit_fit.exponent == pytest.approx(1.0) and view.grad_norm_fit.exponent == pytest.approx(math.log10(2))
    assert view.predicted_divergence_params == pytest.approx(1e6)


def test_default_view_is_at_the_baselines_best_small_lr_with_a_threshold_calibrated_on_it():
    table = {  # size: (non-embedding parameters, val loss per LR, max logit per LR) at LRs 1e-3, 1e-2, 1e-1
        "tiny": (1_000, [2.5, 2.3, 3.0], [5.0, 20.0, 500.0]),
        "small": (8_000, [2.4, 2.55, 3.2], [8.0, 60.0, 5000.0]),
    }
    rows = [
        _row(size, lr, loss, logit, n)
        for size, (n, losses, logits) in table.items()
        for lr, loss, logit in zip([1e-3, 1e-2, 1e-1], losses, logits, strict=True)
    ]
    rows += [{**r, "recipe": "qk_norm", "max_attn_logit": 4.0} for r in rows]
    curves = summarize(rows)
    views = scaling_views(rows, curves)
    assert [v.recipe for v in views] == ["baseline", "qk_norm"]
    base, qk = views
    # best LR of the baseline at the smallest size (tiny: 2.3 at 1e-2); the threshold is the smallest logit
    # of a run > 0.1 nats worse than its curve's best above that curve's best LR (small, 1e-2: 60).
    assert base.lr == 1e-2 and base.divergence_logit == 60.0 and base.threshold_source == "calibrated on baseline"
    assert base.logit_fit.exponent == pytest.approx(math.log(3) / math.log(8))
    assert base.predicted_divergence_params == pytest.approx(8_000)
    assert qk.divergence_logit == 60.0 and qk.predicted_divergence_params == math.inf  # flat logits
    given = scaling_views(rows, curves, lr=0.09, divergence_logit=1e4)[0]
    assert given.lr == 1e-1 and given.divergence_logit == 1e4 and given.threshold_source == "given"


def test_the_scaling_lines_of_the_table_say_where_the_logit_would_reach_the_threshold():
    from keel.proxy.sweep.summary import format_tables

    rows = [
        _row(size, 1e-2, 2.4, logit, n, recipe=recipe)
        for recipe, logits in (("baseline", (10.0, 100.0)), ("flat", (5.0, 5.0)), ("creeps", (5.0, 6.3)))
        for size, n, logit in zip(("tiny", "small"), (1_000, 10_000), logits, strict=True)
    ]
    text = format_tables(summarize(rows), scaling_views(rows, summarize(rows), lr=1e-2, divergence_logit=1e4))
    lines = {line.split()[0]: line for line in text.splitlines()[-3:]}
    assert lines["baseline"].endswith("logit ∝ N^1.00; reaches 1e+04 (given) at ≈1e+06 params")
    assert lines["flat"].endswith("; no growth: never reaches 1e+04 (given)")
    # 5 → 6.3 over a decade: ∝ N^0.1, reaching 1e4 only near 1e36 parameters, far beyond any real model
    assert "practically flat: reaches 1e+04 (given) only at ≈" in lines["creeps"]


def test_without_a_threshold_the_scaling_line_says_how_to_give_one_not_nan():
    from keel.proxy.sweep.summary import reach

    rows = [_row(size, 1e-2, 2.4, logit, n) for size, n, logit in (("tiny", 1_000, 10.0), ("small", 10_000, 100.0))]
    view = scaling_views(rows, summarize(rows), lr=1e-2, divergence_logit=None)[0]
    assert math.isnan(view.divergence_logit)
    said = reach(view)
    assert said == (
        "no divergence threshold: no run above its curve's best LR ended worse than the best, to calibrate one "
        "on (give one with --divergence-logit)"
    )  # reviewer W (session 15): read "no run to calibrate it on degraded"
