"""What a screen-reader or keyboard user gets from the page without a browser: each chart named, and the numbers and
marks behind it (a hover label's text) in a table folded under it; the named cause a heading; text colours that
meet WCAG AA contrast (4.5:1). axe-core found the last two (session 18, /work/notes/h30-C-findings.md)."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Decision, Finding
from keel.report import write_report
from keel.report.chart_text import chart_block
from keel.report.charts import Chart
from keel.report.charts import marks as chart_marks
from keel.report.run_data import RunData
from keel.report.sections import MAX_ROWS
from tests.report.stores import make_run_store
from tests.report.test_page import _payload

CSS = (Path(__file__).resolve().parents[2] / "src" / "keel" / "report" / "report.css").read_text()


class _Tree(HTMLParser):
    """Elements (tag, attributes) in document order and the text of each cell and summary."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[str] = []
        self.summaries: dict[str, str] = {}
        self._text: list[str] | None = None
        self._summary: str | None = None
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag in ("td", "summary"):
            self._text = []
            self._summary = dict(attrs).get("id") if tag == "summary" else None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "summary") and self._text is not None:
            text = "".join(self._text)
            if tag == "td":
                self.cells.append(text)
            else:
                self.summaries[self._summary or ""] = text
            self._text = None

    def tags(self) -> set[str]:
        return {tag for tag, _ in self.elements}


def test_each_chart_is_named_and_described_by_the_numbers_folded_under_it(tmp_path):
    make_run_store(tmp_path / "runs" / "a", seed=0, nan_at=220)
    make_run_store(tmp_path / "runs" / "b", seed=1, policy="recover", rollback=(100, 160))
    page = write_report([tmp_path / "runs"], tmp_path / "report.html").read_text()
    tree = _Tree(page)
    charts = {attrs["id"]: attrs for tag, attrs in tree.elements if "chart" in (attrs.get("class") or "").split()}
    titles = {c["id"]: c["title"] for c in _payload(page)["charts"]}
    assert set(charts) == set(titles)
    for chart_id, attrs in charts.items():
        assert attrs["role"] == "figure" and attrs["aria-label"] == f"chart: {titles[chart_id]}"
        assert tree.summaries[attrs["aria-describedby"]].startswith(
            f"the numbers behind “{titles[chart_id]}”: 2 run(s)"
        )
    loss = page[page.index("id='chart-0-numbers'") : page.index("</details>", page.index("id='chart-0-numbers'"))]
    cells = _Tree(f"<table>{loss}").cells
    row = cells[cells.index("a") : cells.index("a") + 7]  # run, signal, steps, last, lowest, highest, not finite
    assert row[1:3] == ["loss", "0–299"] and row[6] == "1"  # the NaN at step 220
    assert float(row[5]) > 7  # the ×4 spike at step 150
    # What a hover label says, for the keyboard: the spike's finding, the skip and the rollback with its reason.
    assert ["150", "a", "critical finding"] == cells[
        cells.index("critical finding") - 2 : cells.index("critical finding") + 1
    ]
    assert any(c.startswith("step 150 · critical · loss_spike The loss jumped") for c in cells)
    assert "skipped step" in cells and "rollback" in cells


def test_a_chart_s_many_marks_are_listed_up_to_the_cap_and_counted():
    steps = np.arange(1000)
    run = RunData(name="r", path=Path("r"), series={"loss": (steps, np.ones(1000))})
    chart = Chart(id="chart-0", base="loss", title="loss", keys=["loss"])
    marks = [{"run": 0, "type": "skip", "step": int(s), "text": f"step {s} · skipped"} for s in steps[::-1]]
    block = chart_block(chart, [run], marks)
    assert block.count("<td>skipped step</td>") == MAX_ROWS and f"… and {1000 - MAX_ROWS} more marks." in block
    assert block.index("<td>step 0 · skipped</td>") < block.index("<td>step 1 · skipped</td>")  # in step order


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
_values = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=40)


@settings(max_examples=25, deadline=None)
@given(name=_text, title=_text, key=_text, values=_values, layered=st.booleans(), reason=_text)
def test_hostile_names_and_values_stay_text_and_the_counts_add_up(name, title, key, values, layered, reason):
    key = key or "k"
    steps = np.arange(len(values), dtype=np.int64)
    series = {key: (steps, np.asarray(values, dtype=np.float64))}
    if layered:
        series[f"{key}/layer.0"] = (steps, np.asarray(values, dtype=np.float64))
    run = RunData(
        name=name,
        path=Path("r"),
        series=series,
        findings=[
            Finding(step=1, kind="loss_spike", severity="warning", signal=key, value=1.0, baseline=1.0, cause=reason)
        ],
        decisions=[Decision(step=2, action="skip", by="guard", reason=reason)],
    )
    chart = Chart(id="chart-0", base=key, title=title, keys=[key], layers=[f"{key}/layer.0"] if layered else [])
    block = chart_block(chart, [run], chart_marks([run], [chart])["chart-0"])
    tree = _Tree(block)
    assert tree.tags() <= {"div", "details", "summary", "table", "caption", "thead", "tbody", "tr", "th", "td", "p"}
    assert tree.elements[0][1]["aria-label"] == f"chart: {title}"
    finite = [v for v in values if math.isfinite(v)]
    rows = [tree.cells[i : i + 7] for i in range(0, 7 * (1 + layered), 7)]
    for row in rows:
        assert row[0] == name and row[6] == str(len(values) - len(finite))
        if finite:
            assert (float(row[4]), float(row[5])) == (float(f"{min(finite):.4g}"), float(f"{max(finite):.4g}"))
    assert f"step 2 · skipped by guard {' '.join(reason.split())}" in tree.cells


def _luminance(hex_color: str) -> float:
    channels = [int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two #rrggbb colours."""
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _rule(selector: str) -> str:
    return re.search(rf"(?m)^{re.escape(selector)} {{([^}}]*)}}", CSS).group(1)


def _color(rule: str, prop: str) -> str | None:
    match = re.search(rf"(?<![-\w]){prop}:\s*(#[0-9a-fA-F]{{3,6}})", rule)
    if match is None:
        return None
    value = match.group(1)
    return value if len(value) == 7 else "#" + "".join(c * 2 for c in value[1:])


def test_the_page_s_text_colours_meet_wcag_aa_contrast():
    assert contrast("#ffffff", "#000000") == 21.0
    page_background = _color(_rule("body"), "background")
    base_text = _color(_rule(".badge"), "color")
    for badge in (".badge.warning", ".badge.critical", ".badge.ok", ".badge"):
        rule = _rule(badge)
        text, background = _color(rule, "color") or base_text, _color(rule, "background")
        assert contrast(text, background) >= 4.5, (badge, text, background)  # white on amber was 2.08
    for muted in ("footer", ".sub, .muted, .path", ".who", ".src, .how", ".values"):
        assert contrast(_color(_rule(muted), "color"), page_background) >= 4.5, muted  # footer #777 was 4.1


def test_the_named_cause_is_a_heading(tmp_path):
    make_run_store(tmp_path / "a")
    page = write_report([tmp_path / "a"], tmp_path / "report.html").read_text()
    assert "<h2 class='named'>named cause</h2>" in page and "<p><b>named cause</b></p>" not in page


def test_the_first_tab_stops_link_to_every_section_of_the_page(tmp_path):
    make_run_store(tmp_path / "a")
    page = write_report([tmp_path / "a"], tmp_path / "report.html").read_text()
    tree = _Tree(page)
    links = [attrs["href"] for tag, attrs in tree.elements if tag == "a"]
    ids = {attrs.get("id") for _, attrs in tree.elements}
    assert links == ["#diagnosis", "#timelines", "#runs", "#decisions"] and all(link[1:] in ids for link in links)
    first_control = next(tag for tag, attrs in tree.elements if tag in ("a", "summary", "button"))
    assert first_control == "a"  # before every chart's numbers and the runs' folded tables


def test_long_tables_repeat_their_header_row_on_each_printed_page(tmp_path):
    make_run_store(tmp_path / "a", rollback=(100, 160))
    page = write_report([tmp_path / "a"], tmp_path / "report.html").read_text()
    elements = _Tree(page).elements
    after_table = {
        attrs.get("class") or "snapshots": elements[i + 1][0]
        for i, (tag, attrs) in enumerate(elements)
        if tag == "table"
    }
    assert {name: after_table[name] for name in ("runs", "decisions", "snapshots", "signals", "marks")} == {
        "runs": "thead",
        "decisions": "thead",
        "snapshots": "thead",
        "signals": "caption",  # then its thead
        "marks": "caption",
    }


def test_a_family_s_row_gives_the_range_of_its_members_last_values():
    steps = np.arange(5)
    members = {
        "attn/max_logit/blocks.0": np.array([1, 2, 9, 4, 5.0]),
        "attn/max_logit/blocks.1": np.array([3, 2, 1, 1, math.nan]),
    }
    run = RunData(name="r", path=Path("r"), series={key: (steps, v) for key, v in members.items()})
    chart = Chart(id="chart-0", base="attn/max_logit", title="attn/max_logit", keys=[], layers=sorted(members))
    cells = _Tree(chart_block(chart, [run], [])).cells
    # run, signal, steps, last (blocks.1's last finite is 1: was 5, the last member's value alone), lowest, highest
    assert cells[:7] == ["r", "attn/max_logit/* (2 members)", "0–4", "1 … 5", "1", "9", "1"]
