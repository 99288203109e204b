import math

import pytest

from keel.proxy.sweep.metrics import lr_sensitivity
from keel.proxy.sweep.scaling import scaling_view
from keel.proxy.sweep.summary import CurveSummary

pytest.importorskip("matplotlib")

from keel.proxy.sweep import RunResult, SweepConfig, SweepStore, expand_grid  # noqa: E402
from keel.proxy.sweep.plots import plot_router_vs_lr, write_plots  # noqa: E402
from keel.proxy.sweep.runner import load_sweep, run_sweep, store_summary  # noqa: E402

LRS = [1e-3, 1e-2, 1e-1]


def _curve(recipe, size, losses, logits, router=None):
    # router: (router z, load imbalance, dead experts) per LR of an MoE recipe; a dense one has NaN
    router_z, load, dead = router or ((math.nan,) * len(LRS),) * 3
    return CurveSummary(
        recipe=recipe,
        size=size,
        n_params=1000 if size == "tiny" else 8000,
        sensitivity=lr_sensitivity(LRS, losses, 5.5),
        max_attn_logit=tuple(logits),
        log_z=(1.0, 2.0, 3.0),
        grad_norm=(0.5, 0.6, 0.7),
        router_z=tuple(router_z),
        load_imbalance=tuple(load),
        dead_experts=tuple(dead),
        runs=3,
        diverged=0,
        errors=0,
    )


def _views():
    rows = [
        dict(recipe="baseline", size=s, lr=1e-2, status="done", n_params=n, max_attn_logit=v, grad_norm=g)
        for s, n, v, g in (("tiny", 1000, 30.0, 0.3), ("small", 8000, 240.0, 0.5))
    ]
    return [
        scaling_view(
            rows,
            recipe="baseline",
            lr=1e-2,
            size_order=["tiny", "small"],
            divergence_logit=1e4,
            threshold_source="given",
        )
    ]


def test_png_files(tmp_path):
    curves = [
        _curve("baseline", "tiny", [2.6, 2.4, 3.1], [20, 30, 1e4]),
        _curve("baseline", "small", [2.5, 2.3, 3.4], [25, 240, 1e5]),
        _curve("qk_norm", "tiny", [2.6, 2.4, 2.5], [5, 6, 8]),
        _curve("moe", "tiny", [2.6, 2.4, 2.5], [5, 6, 8], router=((2.0, 50.0, 900.0), (1.2, 1.5, 2.0), (0, 0, 2))),
    ]
    views = _views()
    assert views[0].logit_fit.exponent == pytest.approx(1.0)  # 30 → 240 over 1000 → 8000 parameters
    paths = write_plots(curves, views, tmp_path / "plots")
    assert [p.name for p in paths] == ["loss_vs_lr.png", "max_logit_vs_lr.png", "router_vs_lr.png", "scaling.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert math.isclose(views[0].predicted_divergence_params, 1000 * (1e4 / 30))


def test_the_router_plot_refuses_a_sweep_without_a_router():
    # write_plots leaves it out then (test_keel_sweep_summarize_writes_no_report_section: 2 PNGs for a dense sweep)
    dense = [_curve("baseline", "tiny", [2.6, 2.4, 3.1], [20, 30, 1e4])]
    with pytest.raises(ValueError, match="no curve of this sweep has a router"):
        plot_router_vs_lr(dense)


def _hand_filled_store(tmp_path):
    # A store filled by hand (no training): the summary is computed from the store alone.
    specs = expand_grid(SweepConfig(recipes=["baseline", "qk_norm"], lrs=LRS, sizes=["tiny"]))
    with SweepStore(tmp_path) as store:
        store.add_runs(specs, lambda rid: tmp_path / rid)
        for spec, loss in zip(specs, [2.6, 2.4, 3.1, 2.6, 2.4, 2.45], strict=True):
            store.record(
                RunResult(
                    run_id=spec.run_id,
                    status="done",
                    init_loss=5.5,
                    val_loss=loss,
                    max_attn_logit=10 * loss,
                    log_z=1.0,
                    grad_norm=0.5,
                    n_params=1000,
                )
            )
    return tmp_path


def test_keel_report_draws_the_summary_the_sweep_stored_without_dropping_any_of_it(tmp_path):
    # The report may not import this package: it reads the summary store_summary keeps in the sweep store.
    # This is the contract between summary.to_json and keel.report.sweep_data.
    pytest.importorskip("plotly")
    import json
    import re

    from keel.report import write_report

    sweep = _hand_filled_store(tmp_path / "sweep")
    result = load_sweep(sweep)
    with SweepStore(sweep) as store:
        store_summary(store, result)
    page = write_report([sweep], tmp_path / "report.html").read_text()
    assert "<p class='problem'>" not in page  # every curve and view of the stored summary was read back
    assert "<td>tiny</td><td>1000</td><td>0.083</td><td>3.6x</td>" in page  # LRS 0.3 vs 0.25/3: 3.6x less
    data = json.loads(re.search(r"id='keel-data'>(.*?)</script>", page, re.S).group(1))
    loss = next(f for f in data["figures"] if f["title"] == "final loss vs LR: qk_norm")
    assert loss["traces"][0]["y"] == list(result.curves[1].sensitivity.losses)
    assert not list(sweep.glob("*.html"))


def test_run_sweep_stores_its_summary_for_the_report(tmp_path, tiny_sweep):
    from keel.store import SweepReader

    result = run_sweep(tiny_sweep(recipes=["baseline"], lrs=[1e-2, 3e-2]), tmp_path, workers=1)
    with SweepReader(tmp_path) as reader:
        summary = reader.summary()
    assert summary["recipes"][0]["lr_sensitivity"] == result.curves[0].sensitivity.lr_sensitivity
    assert summary["runs"] == {"done": 2} and not list(tmp_path.glob("*.html"))


def test_keel_sweep_summarize_writes_no_report_section(tmp_path, capsys):
    from keel.cli import main

    sweep = _hand_filled_store(tmp_path / "sweep")
    assert main(["sweep", "--out", str(sweep), "--summarize", "--plots", str(tmp_path / "plots")]) == 0
    assert f"keel report {sweep} draws them from the store" in capsys.readouterr().out
    assert not list(sweep.glob("*.html")) and len(list((tmp_path / "plots").glob("*.png"))) == 2
