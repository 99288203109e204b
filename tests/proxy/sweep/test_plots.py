import math

import pytest

from keel.proxy.sweep.metrics import lr_sensitivity
from keel.proxy.sweep.scaling import scaling_view
from keel.proxy.sweep.summary import CurveSummary

pytest.importorskip("matplotlib")

from keel.proxy.sweep import RunResult, SweepConfig, SweepStore, expand_grid  # noqa: E402
from keel.proxy.sweep.plots import sweep_section, write_plots, write_section  # noqa: E402
from keel.proxy.sweep.runner import load_sweep  # noqa: E402

LRS = [1e-3, 1e-2, 1e-1]


def _curve(recipe, size, losses, logits):
    return CurveSummary(
        recipe=recipe,
        size=size,
        n_params=1000 if size == "tiny" else 8000,
        sensitivity=lr_sensitivity(LRS, losses, 5.5),
        max_attn_logit=tuple(logits),
        log_z=(1.0, 2.0, 3.0),
        grad_norm=(0.5, 0.6, 0.7),
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


def test_png_files_and_html_fragment(tmp_path):
    curves = [
        _curve("baseline", "tiny", [2.6, 2.4, 3.1], [20, 30, 1e4]),
        _curve("baseline", "small", [2.5, 2.3, 3.4], [25, 240, 1e5]),
        _curve("qk_norm", "tiny", [2.6, 2.4, 2.5], [5, 6, 8]),
    ]
    views = _views()
    assert views[0].logit_fit.exponent == pytest.approx(1.0)  # 30 → 240 over 1000 → 8000 parameters
    paths = write_plots(curves, views, tmp_path / "plots")
    assert [p.name for p in paths] == ["loss_vs_lr.png", "max_logit_vs_lr.png", "scaling.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert math.isclose(views[0].predicted_divergence_params, 1000 * (1e4 / 30))


def _hand_filled_store(tmp_path):
    # A store filled by hand (no training): the fragment is built from the store alone, as the report does.
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


def test_report_section_from_a_sweep_store(tmp_path):
    _hand_filled_store(tmp_path)
    fragment = sweep_section(tmp_path, title="a <sweep>")
    assert fragment.startswith('<section class="keel-sweep"><h2>a &lt;sweep&gt;</h2>')
    assert fragment.count("data:image/png;base64,") == 2  # one size: no scaling figure
    assert "qk_norm\n  size" in fragment and "3.6x" in fragment  # LRS 0.3 vs 0.25/3: 3.6 times less sensitive


def test_keel_report_of_a_sweep_directory_shows_the_section_keel_sweep_rendered(tmp_path, capsys):
    pytest.importorskip("plotly")
    import os

    from keel.cli import main

    sweep = _hand_filled_store(tmp_path / "sweep")
    assert main(["report", str(sweep), "-o", str(tmp_path / "none.html")]) == 2  # nothing rendered yet
    assert "keel sweep --out DIR --summarize` writes it" in capsys.readouterr().err

    assert main(["sweep", "--out", str(sweep), "--summarize"]) == 0  # renders sweep_section.html
    assert f"keel report {sweep}" in capsys.readouterr().out
    for leftover in ("sweep.sqlite-wal", "sweep.sqlite-shm"):  # as a closed sweep leaves it: no WAL file
        (sweep / leftover).unlink(missing_ok=True)
    assert main(["report", str(sweep), "-o", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    fragment = (sweep / "sweep_section.html").read_text()
    assert fragment in page and fragment.count("data:image/png;base64,") == 2
    assert "qk_norm\n  size" in page and "<h2>Runs</h2>" not in page  # a sweep alone: its section is the page
    assert "changed after its section was rendered" not in page

    store = sweep / "sweep.sqlite"
    later = (sweep / "sweep_section.html").stat().st_mtime + 10
    os.utime(store, (later, later))  # the sweep went on after the section was rendered
    assert main(["report", str(sweep), "-o", str(tmp_path / "stale.html")]) == 0
    assert "the sweep changed after its section was rendered" in (tmp_path / "stale.html").read_text()
    write_section(load_sweep(sweep), sweep)
    os.utime(sweep / "sweep_section.html", (later + 1, later + 1))
    assert main(["report", str(sweep), "-o", str(tmp_path / "fresh.html")]) == 0
    assert "changed after its section was rendered" not in (tmp_path / "fresh.html").read_text()


@pytest.mark.browser
def test_a_sweep_only_report_opens_in_chromium_without_errors(tmp_path):
    pytest.importorskip("plotly")
    from tests.report.browser import chromium_binary, load

    if chromium_binary() is None:
        pytest.skip("chromium is not installed (apt-get install chromium; CI installs it)")
    from keel.report import write_report

    sweep = _hand_filled_store(tmp_path / "sweep")
    write_section(load_sweep(sweep), sweep)
    page = write_report([sweep], tmp_path / "report.html")
    result = load(page, tmp_path / "profile")
    assert result["status"] is not None, result["stderr_tail"]
    assert result["status"]["errors"] == [] and result["console"] == []
    assert result["dom"].count('<img alt="') == 2 and "LR sensitivity sweep" in result["dom"]
