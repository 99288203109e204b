"""The report used from the keyboard, in a 400 px window (200 % zoom of an 800 px one), under Windows high
contrast (forced colours) and printed, in a real Chromium driven by chromedriver (`tests.report.webdriver`).

With $KEEL_AXE set to axe-core's ``axe.min.js`` (``npm install axe-core``), the page is also audited by axe.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from keel.report import write_report
from keel.report.page import PALETTE
from tests.report.browser import chromium_binary
from tests.report.stores import make_run_store
from tests.report.webdriver import Browser, chromedriver_binary

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        chromium_binary() is None or chromedriver_binary() is None,
        reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver; CI does)",
    ),
]
TOOLBAR = ["Download plot as a PNG", "Zoom", "Pan", "Zoom in", "Zoom out", "Autoscale", "Reset axes"]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("access")
    make_run_store(root / "runs" / "guarded", policy="skip", seed=0)
    make_run_store(root / "runs" / "recovering", policy="recover", seed=1, rollback=(100, 160))
    # A name without spaces, as a log's file name is (keel report bigscience_….csv): made a 1000 px window scroll.
    make_run_store(root / "runs" / "bigscience_tr8_104b_exp12_spike_8740_divergence_9027", policy="observe", seed=2)
    return write_report([root / "runs"], root / "report.html")


@pytest.fixture(scope="module")
def browser(page):
    """One Chromium for the module's tests (each start and page load costs seconds), the page loaded."""
    with Browser() as driven:
        driven.open(page)
        yield driven


def _x_range(browser: Browser, chart: str) -> list[float]:
    return browser.js("return document.getElementById(arguments[0])._fullLayout.xaxis.range.slice()", chart)


def test_the_keyboard_zooms_every_chart_and_opens_the_numbers_a_hover_label_shows(browser):
    buttons = browser.js("return [...document.querySelectorAll('#chart-0 .modebar-btn')].map(b => b.dataset.title)")
    assert buttons == TOOLBAR  # no "Share chart..." (an upload to Plotly Cloud), no box/lasso select
    # A chart's SVG (tick labels, legend) is hidden from a screen reader: its name and numbers stand for it.
    assert browser.js("return document.querySelectorAll('.chart svg.main-svg:not([aria-hidden=true])').length") == 0
    links = browser.js("return [...document.querySelectorAll('nav.jump a')].map(a => a.getAttribute('href'))")
    browser.press("tab")  # the first tab stop: the section links, shown while focused
    link = browser.focused()
    assert link["tag"] == "A" and link["visible"] and links[0] == "#diagnosis"
    browser.press(*["tab"] * len(links))
    first = browser.focused()
    assert (first["chart"], first["title"]) == ("chart-0", TOOLBAR[0]) and first["visible"]
    assert first["outline"] != "none" and first["outline_px"] >= 2  # a focus ring one can see
    before = _x_range(browser, "chart-1")
    browser.press(*["tab"] * TOOLBAR.index("Zoom in"))
    assert browser.focused()["title"] == "Zoom in"
    browser.press("enter")
    # The other charts follow the zoom (was: plotly's zoom in halves the range).
    width = before[1] - before[0]
    narrower = "var r = document.getElementById('chart-1')._fullLayout.xaxis.range; return r[1] - r[0] < arguments[0]"
    browser.wait_for(narrower, 0.75 * width)
    browser.press(*["tab"] * (len(TOOLBAR) - TOOLBAR.index("Zoom in")), "enter")
    opened = browser.js("var d = document.activeElement.closest('details'); return d && d.open && d.innerText")
    assert opened and "critical finding" in opened and "loss_spike" in opened and "skipped step" in opened
    browser.js("document.querySelector('nav.jump a[href=\"#runs\"]').focus()")
    browser.press("enter")
    browser.wait_for("return location.hash === '#runs'", timeout=10)
    top, height = browser.js("return [document.getElementById('runs').getBoundingClientRect().top, innerHeight]")
    assert 0 <= top < height / 2, (top, height)  # the runs' section scrolled into view


def test_printing_draws_each_chart_within_the_paper_and_prints_the_folded_tables(browser):
    screen = browser.js("return document.getElementById('chart-0')._fullLayout.width")
    folded = browser.js("return document.querySelectorAll('details:not([open])').length")
    browser.js(  # what the page looks like while it prints (registered after the page's own handler)
        "window.addEventListener('beforeprint', () => { window.printed = {"
        " widths: [...document.querySelectorAll('.chart')].map(c => c._fullLayout.width),"
        " closed: document.querySelectorAll('details:not([open])').length}; });"
    )
    pdf = base64.b64decode(browser.cdp("Page.printToPDF", {"printBackground": True})["data"])
    assert pdf.startswith(b"%PDF")
    printed = browser.js("return window.printed")
    assert max(printed["widths"]) <= 700 and printed["closed"] == 0, printed  # Letter and A4: ~720 px wide
    assert browser.js("return document.querySelectorAll('details:not([open])').length") == folded  # folded again
    assert browser.js("return document.getElementById('chart-0')._fullLayout.width") == screen


def test_a_400_px_window_scrolls_no_page_sideways_and_high_contrast_keeps_the_run_colours(browser, page):
    browser.cdp(
        "Emulation.setDeviceMetricsOverride", {"width": 400, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    )
    browser.open(page)
    browser.js("document.querySelectorAll('details').forEach(d => { d.open = true; })")
    widths = browser.js(
        "return {page: document.scrollingElement.scrollWidth, window: document.documentElement.clientWidth,"
        " charts: [...document.querySelectorAll('.chart')].map(c => c.getBoundingClientRect().right)}"
    )
    assert widths["page"] <= widths["window"] and max(widths["charts"]) <= widths["window"], widths
    browser.cdp("Emulation.setEmulatedMedia", {"features": [{"name": "forced-colors", "value": "active"}]})
    assert browser.js("return matchMedia('(forced-colors: active)').matches")
    swatch = browser.js("return getComputedStyle(document.querySelector('.swatch')).backgroundColor")
    red, green, blue = (int(PALETTE[0][i : i + 2], 16) for i in (1, 3, 5))
    assert swatch == f"rgb({red}, {green}, {blue})"  # was repainted to the window colour: no key left
    browser.cdp("Emulation.setEmulatedMedia", {"features": []})
    browser.cdp("Emulation.clearDeviceMetricsOverride")


@pytest.mark.skipif(not os.environ.get("KEEL_AXE"), reason="set KEEL_AXE to axe-core's axe.min.js to audit")
def test_axe_finds_no_violation(browser, page):
    browser.open(page)
    browser.js(Path(os.environ["KEEL_AXE"]).read_text())
    browser.js("document.querySelectorAll('details').forEach(d => { d.open = true; })")
    violations = browser.js_async(
        "var done = arguments[0]; axe.run(document, {resultTypes: ['violations']})"
        ".then(r => done(r.violations.map(v => v.id + ' x' + v.nodes.length)), e => done(['error ' + e]));"
    )
    assert violations == []
