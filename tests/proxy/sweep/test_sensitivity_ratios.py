"""The sweep table's "vs base" column compares only curves that compare: a recipe whose every run diverged (LRS 0,
a flag) or whose runs raised at some LRs (a shorter LR grid) was shown "inf x" less LR-sensitive than the baseline
(reviewer V6)."""

import math

import pytest

from keel.proxy.sweep.summary import format_tables, sensitivity_ratios, summarize, to_json

LRS = (1e-3, 1e-2, 1e-1)
INIT = 5.5


def _row(recipe, lr, val_loss, status="done"):
    return dict(
        recipe=recipe,
        size="tiny",
        lr=lr,
        seed=0,
        status=status,
        val_loss=val_loss,
        init_loss=INIT,
        max_attn_logit=10.0,
        log_z=1.0,
        grad_norm=0.5,
        n_params=1000,
    )


def _rows():
    return [
        *(_row("baseline", lr, v) for lr, v in zip(LRS, (3.0, 2.0, 4.0), strict=True)),
        *(_row("steadier", lr, v) for lr, v in zip(LRS, (2.5, 2.0, 2.5), strict=True)),
        *(_row("huge_lr", lr, math.nan, status="diverged") for lr in LRS),  # every run diverged: all at ℓ₀
        _row("half_boom", 1e-3, 3.0),
        _row("half_boom", 1e-2, 2.0),
        _row("half_boom", 1e-1, math.nan, status="error"),  # raised: left out of its curve
    ]


def test_only_comparable_curves_get_a_ratio():
    curves = summarize(_rows())
    ratios = sensitivity_ratios(curves)
    # baseline LRS = mean(1, 0, 2) = 1; steadier = mean(0.5, 0, 0.5) = 1/3
    assert ratios[("steadier", "tiny")] == pytest.approx(3.0)
    assert ratios[("baseline", "tiny")] == pytest.approx(1.0)
    assert ("huge_lr", "tiny") not in ratios and ("half_boom", "tiny") not in ratios
    by_name = {c.recipe: c for c in curves}
    assert by_name["huge_lr"].all_at_init and by_name["huge_lr"].sensitivity.lr_sensitivity == 0.0
    assert not by_name["half_boom"].all_at_init


def test_the_table_and_json_say_so():
    curves = summarize(_rows())
    text = format_tables(curves, [])
    assert "inf" not in text
    huge = next(line for line in text.splitlines() if line.strip().startswith("tiny") and "3" in line.split()[-2])
    assert huge.split()[2] == "—" and huge.split()[3] == "—"  # LRS and vs base
    doc = {r["name"]: r for r in to_json(curves, [], _rows())["recipes"]}
    assert doc["huge_lr"]["all_at_init"] is True and doc["huge_lr"]["sensitivity_vs_baseline"] is None
    assert doc["half_boom"]["sensitivity_vs_baseline"] is None and doc["half_boom"]["errors"] == 1
    assert doc["steadier"]["sensitivity_vs_baseline"] == pytest.approx(3.0)


def test_an_all_diverged_baseline_gives_no_ratio_to_anyone():
    rows = [r for r in _rows() if r["recipe"] != "baseline"]
    rows += [_row("baseline", lr, math.inf, status="diverged") for lr in LRS]
    assert sensitivity_ratios(summarize(rows)) == {}


def test_a_curve_of_one_lr_gets_no_ratio_not_even_against_itself():
    # a sweep killed after its first run: the baseline's one point showed "inf x" against itself (reviewer V6)
    assert sensitivity_ratios(summarize([_row("baseline", 1e-2, 2.0)])) == {}


def test_a_curve_whose_every_run_diverged_names_no_best_lr_or_lr_range():
    # Reviewer W (session 15): `keel sweep --lrs 1e2 1e4` (every run diverged) printed "best lr 1e+02" and
    # "lr range 1e+02 … 1e+04" for the recipe: every LR "within 0.1 nats of the best", the best being ℓ₀.
    text = format_tables(summarize(_rows()), [])
    huge = next(line for line in text.splitlines() if line.strip().startswith("tiny") and "3" in line.split()[-2])
    size, params, lrs, vs_base, best_lr, best_loss, lr_range, *_ = huge.split()
    assert (lrs, vs_base, best_lr, lr_range) == ("—", "—", "—", "—") and float(best_loss) == INIT
