"""A report of 40 runs in a real headless Chromium: every chart keeps a plot area a person can read.

Helper E (session 16): with 40 runs (a sweep's folder of runs) each chart kept its 320 px while its legend grew to
eight rows under it, and the plot itself was left ~90 px tall; charts now grow with their legend's rows.
"""

from __future__ import annotations

import pytest

from keel.report import write_report
from keel.store import RunWriter
from tests.report.browser import ARTIFACTS, chromium_binary, load, screenshot

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,  # one Chromium load of a 40-run page: ~10 s on a loaded 2-core box
    pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)"),
]


def test_forty_runs_leave_every_plot_area_readable(tmp_path):
    runs = []
    for i in range(40):
        run = tmp_path / f"qk_norm_z_loss_tiny_lr={10 ** (-4 + i % 10 / 3):.2g}_seed={i // 10}"
        with RunWriter(run) as writer:
            writer.add_series("loss", range(50), [3.0 - 0.01 * s + 0.001 * i for s in range(50)])
            writer.add_series("grad/norm", range(50), [1.0 + 0.01 * i] * 50)
        runs.append(run)
    page = write_report(runs, tmp_path / "report.html")
    result = load(page, tmp_path / "profile")
    status = result["status"]
    assert status["errors"] == [] and result["console"] == [], (status["errors"], result["console"])
    assert status["rendered"] == status["charts"] == 2
    assert min(status["plot_heights"]) >= 180, status["plot_heights"]
    screenshot(page, ARTIFACTS / "report_forty_runs.png", tmp_path / "profile-shot", height=1800)
