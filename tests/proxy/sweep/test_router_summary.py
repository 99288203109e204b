"""The router's end signals in the sweep summary: CurveSummary, ``keel sweep --json`` and the text tables."""

import json
import math

import pytest

from keel.proxy.sweep.summary import format_tables, summarize, to_json

LRS = (1e-2, 1e-1)


def _row(recipe, lr, seed, router=None):
    row = dict(
        recipe=recipe,
        size="tiny",
        lr=lr,
        seed=seed,
        status="done",
        val_loss=2.5,
        init_loss=5.5,
        max_attn_logit=10.0,
        log_z=1.0,
        grad_norm=0.5,
        n_params=1000,
    )
    if router is not None:  # a dense run's row: no router column at all, as a row built before they existed
        row.update(zip(("router_z", "load_imbalance", "dead_experts"), router, strict=True))
    return row


def _rows():
    return [
        *(_row("baseline", lr, 0) for lr in LRS),
        # two seeds of an MoE recipe; at 0.1 one seed's router z is NaN (its run measured none): the mean skips it
        _row("moe", 1e-2, 0, (10.0, 1.5, 0.0)),
        _row("moe", 1e-2, 1, (30.0, 2.5, 2.0)),
        _row("moe", 1e-1, 0, (math.nan, 2.0, 1.0)),
        _row("moe", 1e-1, 1, (900.0, 2.0, 3.0)),
    ]


def test_a_curve_carries_the_seed_mean_of_the_routers_end_signals_per_lr():
    dense, moe = summarize(_rows())
    assert not dense.has_router and all(math.isnan(v) for v in (*dense.router_z, *dense.dead_experts))
    assert moe.has_router
    assert moe.router_z == (20.0, 900.0) and moe.load_imbalance == (2.0, 2.0) and moe.dead_experts == (1.0, 2.0)


def test_sweep_json_has_the_router_fields_per_lr_with_null_for_a_dense_model():
    dense, moe = to_json(summarize(_rows()), [], _rows())["recipes"]
    assert moe["router_z"] == [20.0, 900.0] and moe["dead_experts"] == [1.0, 2.0]
    assert dense["router_z"] == [None, None] and dense["load_imbalance"] == [None, None]
    assert json.loads(json.dumps(moe, allow_nan=False)) == moe  # strict JSON: no NaN


def test_the_router_table_shows_the_moe_curves_only_and_only_when_there_is_one():
    text = format_tables(summarize(_rows()), [])
    router = text[text.index("router at the end of the run") :].splitlines()
    assert router[1].split() == ["recipe", "size", "lr", "1e-02", "lr", "1e-01"]
    assert router[2].split() == ["moe", "tiny", "20", "/", "2", "/", "1", "900", "/", "2", "/", "2"]
    assert len(router) == 3  # the dense baseline has no row
    dense_only = format_tables(summarize([r for r in _rows() if r["recipe"] == "baseline"]), [])
    assert "router" not in dense_only


@pytest.mark.parametrize("seeds", [1, 2])
def test_an_moe_curve_whose_runs_measured_no_router_has_no_router_row(seeds):
    rows = [_row("moe", lr, s, (math.nan, math.nan, math.nan)) for lr in LRS for s in range(seeds)]
    (curve,) = summarize(rows)
    assert not curve.has_router and "router" not in format_tables([curve], [])
