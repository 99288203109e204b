"""The report in a real headless Chromium: every chart drawn, no console message, no error.

A screenshot is kept under test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from keel.report import write_report
from tests.report.browser import ARTIFACTS, chromium_binary, load, screenshot
from tests.report.stores import make_run_store

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        chromium_binary() is None, reason="chromium is not installed (apt-get install chromium; CI installs it)"
    ),
]


class _Charts(HTMLParser):
    """Attributes of the chart <div>s in a dumped DOM, and how many plotly SVG roots each holds."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict] = {}
        self._stack: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "chart" in (a.get("class") or "").split():
            self.charts[a["id"]] = {"rendered": a.get("data-rendered"), "svgs": 0}
            self._stack.append(a["id"])
        elif tag == "div":
            self._stack.append(self._stack[-1] if self._stack else None)
        if tag == "svg" and "main-svg" in (a.get("class") or "") and self._stack and self._stack[-1]:
            self.charts[self._stack[-1]]["svgs"] += 1

    def handle_endtag(self, tag):
        if tag == "div" and self._stack:
            self._stack.pop()


def _check(page: Path, tmp_path: Path, fragment: str = "") -> dict:
    result = load(page, tmp_path / f"profile{fragment}", fragment=fragment)
    status = result["status"]
    assert status, f"the page never published its status: {result['stderr_tail']}"
    assert status["errors"] == [] and result["console"] == [], (status["errors"], result["console"])
    assert status["charts"] > 0 and status["rendered"] == status["charts"]
    parser = _Charts()
    parser.feed(result["dom"])
    assert len(parser.charts) == status["charts"]
    for chart_id, chart in parser.charts.items():
        assert chart["rendered"] == "1" and chart["svgs"] >= 1, chart_id
    return result


def test_demo_arms_report_draws_every_chart_without_errors(tmp_path):
    root = tmp_path / "demo"
    make_run_store(root / "bare", policy="observe", skip_at=None, seed=0)
    make_run_store(root / "guarded", policy="skip", seed=1, nan_at=220)
    make_run_store(root / "recovering", policy="recover", seed=2, rollback=(100, 160))
    make_run_store(root / "stabilized", policy="recover", seed=3, spike_at=None, skip_at=None)
    page = write_report([root], tmp_path / "report.html")
    result = _check(page, tmp_path)
    assert result["status"]["charts"] == 6
    first = result["status"]["first_screen"]  # runs, named cause and loss chart with its marks: one screen
    assert 500 < first["bottom"] <= first["height"], first  # a 1400×1000 window shows 857 px of page
    view = result["status"]["view"]  # the bare run's loss, whole run: 300 points, the ×4 spike at 150 in view
    assert view["points"] == 300 and view["max"] > 7
    zoomed = _check(page, tmp_path, "steps=140-160")["status"]
    assert zoomed["range"] == [140, 160]
    assert (zoomed["view"]["first"], zoomed["view"]["last"], zoomed["view"]["points"]) == (139, 160, 22)
    assert zoomed["view"]["max"] == pytest.approx(view["max"])
    shot = screenshot(page, ARTIFACTS / "report-demo-arms.png", tmp_path / "profile-shot")
    assert shot.is_file() and shot.stat().st_size > 50_000


@pytest.mark.slow
def test_a_100k_step_report_loads_in_seconds(tmp_path):
    make_run_store(
        tmp_path / "long",
        steps=100_000,
        layers=4,
        snapshot_every=10_000,
        spike_at=70_000,
        skip_at=70_000,
        rollback=(40_000, 41_000),
        per_param=False,
    )
    page = write_report([tmp_path / "long"], tmp_path / "report.html")
    result = _check(page, tmp_path)
    assert result["status"]["view"]["last"] == 99_999  # the whole run is there …
    assert result["status"]["view"]["points"] <= 2 * 1200 + 2  # … as min/max buckets and its ends
    assert result["status"]["view"]["max"] > 7  # the one-step spike at 70,000 survives downsampling
    zoomed = _check(page, tmp_path, "steps=69990-70010")["status"]["view"]
    assert zoomed["points"] == 22 and zoomed["max"] == pytest.approx(result["status"]["view"]["max"])
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report-100k.json").write_text(
        json.dumps(
            {
                "html_bytes": page.stat().st_size,
                "chromium_seconds": round(result["seconds"], 2),
                "page_drawn_ms": result["status"]["drawn_ms"],
                "charts": result["status"]["charts"],
            },
            indent=2,
        )
    )
    screenshot(page, ARTIFACTS / "report-100k.png", tmp_path / "profile-shot")
    assert result["seconds"] < 60  # browser start + parse + draw; a few seconds on a quiet machine


@pytest.mark.slow
def test_the_real_demo_report_renders(tmp_path, monkeypatch):
    import keel.demo
    from keel.cli import main

    monkeypatch.setattr(keel.demo, "QUICK_STEPS", 30)
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--json"]) == 0
    page = write_report([tmp_path / "demo"], tmp_path / "report.html")
    _check(page, tmp_path)
    screenshot(page, ARTIFACTS / "report-demo.png", tmp_path / "profile-shot")


def _y_ticks(dom: str, title: str) -> list[float]:
    """The y-axis tick labels of the chart titled ``title``, as numbers."""
    import re

    chunk = next(c for c in dom.split('<div class="chart ') if f">{title}<" in c)
    labels = re.findall(r'class="ytick"><text [^>]*data-unformatted="([^"]*)"', chunk)
    numbers = []
    for label in labels:  # "0.5", "\u22120.5", or exponentformat "power": "1.5×10&lt;sup&gt;-4&lt;/sup&gt;"
        label = label.replace("\u2212", "-").replace("&lt;", "<").replace("&gt;", ">")
        power = re.fullmatch(r"(?:(.*)×)?10<sup>(.*)</sup>", label)
        numbers.append(float(power.group(1) or 1) * 10 ** float(power.group(2)) if power else float(label))
    return numbers


def test_a_constant_learning_rate_is_drawn_at_its_value(tmp_path):
    # Reviewer W (session 15): a run without an LR schedule (lr 3e-4 at every step) drew its LR chart from -0.5 to 1,
    # the line on the tick labelled 0: plotly's autorange of a constant series is the value +- 1.
    from keel.store import RunWriter

    with RunWriter(tmp_path / "run") as writer:
        for step in range(50):
            writer.add_signals(step, {"loss": 3.0 - step / 100, "lr": 3e-4})
    page = write_report([tmp_path / "run"], tmp_path / "r.html")
    ticks = _y_ticks(_check(page, tmp_path)["dom"], "learning rate (lr)")
    assert ticks and min(ticks) > 0 and min(ticks) <= 3e-4 <= max(ticks) and max(ticks) < 1e-3, ticks
