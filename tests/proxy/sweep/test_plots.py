import math

import pytest

from keel.proxy.sweep.metrics import lr_sensitivity
from keel.proxy.sweep.scaling import scaling_view
from keel.proxy.sweep.summary import CurveSummary

pytest.importorskip("matplotlib")

from keel.proxy.sweep.plots import sweep_html, write_plots  # noqa: E402

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
    # The report's fragment: the tables and the figures inline (no scaling figure from a single size).
    fragment = sweep_html(curves[2:], [], title="a <sweep>")
    assert fragment.startswith('<section class="keel-sweep"><h2>a &lt;sweep&gt;</h2>')
    assert fragment.count("data:image/png;base64,") == 2 and "qk_norm\n  size" in fragment
