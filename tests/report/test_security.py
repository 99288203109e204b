"""The report treats every store as untrusted input: whatever a crafted store holds, the page shows it as text,
runs no script of its own and renders without an error (issue 12, items 8 and 9)."""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
from html.parser import HTMLParser
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel._core import Decision, Finding
from keel.cli import main
from keel.report import ReportError, build_page, write_report
from keel.report.run_data import RunData
from keel.report.sections import esc
from keel.report.sweep_data import Curve, Scaling, SweepData
from tests.report.browser import chromium_binary, load
from tests.report.hostile import COLUMNS, RUN_NAME, crafted, hostile_run_store, hostile_sweep_store
from tests.report.stores import make_run_store, make_sweep_store, sweep_summary

# Every element keel's page is made of; anything else in a page came from a store.
KEEL_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "script",
    "style",
    "body",
    "main",
    "h1",
    "h2",
    "h3",
    "div",
    "p",
    "span",
    "table",
    "caption",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "details",
    "summary",
    "dl",
    "dt",
    "dd",
    "code",
    "b",
    "ol",
    "li",
    "pre",
    "footer",
    "section",
    "br",
    "nav",  # the section links: in-page only (checked below)
    "a",
}


class _Elements(HTMLParser):
    """Every element of a page (tag and attributes), as a browser's parser sees the markup."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def tags(self) -> set[str]:
        return {tag for tag, _ in self.elements}

    def handlers(self) -> list[str]:
        return [f"<{tag} {name}>" for tag, attrs in self.elements for name in attrs if name.startswith("on")]

    def outside_links(self) -> list[str]:
        """Links that leave the page (keel's own are to its sections, ``#runs``)."""
        return [
            str(attrs.get("href"))
            for tag, attrs in self.elements
            if tag == "a" and not (attrs.get("href") or "").startswith("#")
        ]

    def script_urls(self) -> list[str]:
        return [
            f"<{tag} {name}={value}>"
            for tag, attrs in self.elements
            for name, value in attrs.items()
            if re.sub(r"\s", "", value or "").lower().startswith("javascript:")
        ]


def _stub_plotly():
    """Plotly's 3.6 MB source is not under test in the builder's property test: a stub keeps each example fast."""
    return mock.patch("keel.report.page.plotly_js", return_value=("/* plotly */", "0"))


def test_a_crafted_store_s_markup_reaches_the_page_only_as_text(tmp_path):
    run, sweep = hostile_run_store(tmp_path / "runs"), hostile_sweep_store(tmp_path / "sweeps")
    page = write_report([run, sweep], tmp_path / "report.html").read_text()
    parsed = _Elements(page)
    assert parsed.tags() <= KEEL_TAGS and parsed.handlers() == [] and parsed.script_urls() == []
    assert parsed.outside_links() == []
    assert page.count("<script") == 4  # the error hook, the data, plotly, the page's script
    assert "data-pwned" not in re.sub(r"setAttribute\(`data-pwned`", "", page.replace("&#x60;", "`"))
    for where in (
        "f.cause",
        "d.reason",
        "s.path",
        "meta.status",
        "config.key",
        "diag.title",
        "rem.how",
        "row1.run_id",
        "row.status",
        "sum.recipe",
        "sum.size",
        "sum.reach",
        "sum.view",
        "meta.sweep.key",
    ):
        assert f"&lt;script&gt;document.documentElement.setAttribute(`data-pwned`,`{where}`)" in page, where


def test_rows_of_the_wrong_type_are_left_out_and_named_in_a_note(tmp_path):
    run = hostile_run_store(tmp_path / "runs")
    page = write_report([run], tmp_path / "report.html").read_text()
    for table, n in (("decisions", 6), ("findings", 6), ("meta", 4), ("signals", 6), ("snapshots", 3)):
        line = f"<p class='problem'>{esc(run.name)}: {table}: {n} row(s) of the wrong type left out (first: "
        assert line in page, table
    sweep = write_report([hostile_sweep_store(tmp_path / "sweeps")], tmp_path / "sweep.html").read_text()
    for table, n in (("meta", 2), ("runs", 7)):
        assert f"<p class='problem'>{table}: {n} row(s) of the wrong type left out (first: " in sweep, table
    for part, n in (("recipes", 5), ("scaling", 3)):
        assert f"&#x27;{part}&#x27;: {n} entr(ies) of the wrong type left out (first: " in sweep, part
    assert "(first: onset is &#x27;&lt;script&gt;document.documentElement" in page  # the value, as text


def _assert_inert(result: dict) -> _Elements:
    """The page loaded in Chromium rendered every chart, logged nothing, ran no payload, holds no foreign
    element, handler or javascript: URL."""
    status, dom = result["status"], result["dom"]
    assert status, f"the page never published its status: {result['stderr_tail']}"
    assert status["errors"] == [] and result["console"] == [], (status["errors"], result["console"])
    assert status["charts"] > 0 and status["rendered"] == status["charts"]
    parsed = _Elements(dom)
    html_attrs = next(attrs for tag, attrs in parsed.elements if tag == "html")
    assert "data-pwned" not in html_attrs, f"a payload ran: {html_attrs['data-pwned']}"
    assert not {"img", "iframe", "object", "embed"} & parsed.tags()
    assert parsed.handlers() == [] and parsed.script_urls() == []
    assert sum(tag == "script" for tag, _ in parsed.elements) == 4
    return parsed


needs_chromium = pytest.mark.skipif(
    chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)"
)


@pytest.mark.browser
@needs_chromium
def test_markup_in_integer_columns_runs_no_script_in_chromium(tmp_path):
    run = make_run_store(tmp_path / "run", steps=60, spike_at=30, skip_at=30, rollback=(10, 40), snapshot_every=20)
    conn = sqlite3.connect(run / "run.sqlite")
    columns = [
        ("findings", "step"),
        ("decisions", "step"),
        ("decisions", "onset"),
        ("decisions", "restored_step"),
        ("snapshots", "step"),
    ]
    for table, column in columns:  # the attack of issue 12, item 8: text where keel writes integers
        act = f"document.documentElement.setAttribute(`data-pwned`,`{table}.{column}`)"
        conn.execute(
            f"UPDATE {table} SET {column} = ? WHERE rowid = (SELECT max(rowid) FROM {table} "
            f"WHERE {column} IS NOT NULL)",
            (f"1<img src=x onerror={act}>",),
        )
    conn.commit()
    conn.close()
    page = write_report([run], tmp_path / "report.html")
    _assert_inert(load(page, tmp_path / "profile"))
    text = page.read_text()
    for table in ("findings", "decisions", "snapshots"):
        assert f"<p class='problem'>run: {table}: " in text and "(text); allowed: an integer)" in text


@pytest.mark.browser
@needs_chromium
def test_hostile_values_in_every_field_run_no_script_and_leave_no_element_in_chromium(tmp_path):
    run, sweep = hostile_run_store(tmp_path / "runs"), hostile_sweep_store(tmp_path / "sweeps")
    page = write_report([run, sweep], tmp_path / "report.html")
    result = load(page, tmp_path / "profile")
    _assert_inert(result)
    assert result["status"]["charts"] == 5 + 4  # the run's timelines; the sweep's figures: one curve, one view
    for where in ("f.cause", "d.reason", "meta.status", "signal.key", "row.status", "sum.reach"):  # shown as text
        assert f"&lt;script&gt;document.documentElement.setAttribute(`data-pwned`,`{where}`)" in result["dom"], where


# ---- the HTML builder, whatever the strings: no "<" of any field reaches the page unescaped -----------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
INTS = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(TEXT, min_size=40, max_size=40),
    ints=st.lists(INTS, min_size=8, max_size=8),
    reals=st.lists(st.floats(), min_size=4, max_size=4),
)
def test_no_field_puts_an_unescaped_lt_into_the_page(texts, ints, reals):
    marked = (f"{texts[i % len(texts)]}<x-{i}>{texts[-i % len(texts)]}" for i in itertools.count())  # "<" marked

    def text() -> str:
        return next(marked)

    steps = np.arange(50)
    member = f"attn/max_logit/{text()}"
    run = RunData(
        name=text(),
        path=Path(text()),
        meta={
            "status": text(),
            "policy": text(),
            "steps": text(),
            "seed": text(),
            "model": text(),
            text(): text(),
            "config": {text(): [text()]},
            "diagnosis": [{"title": text(), "kind": text(), "when": text()}, text()],
        },
        series={
            "loss": (steps, np.linspace(3, 2, 50)),
            text(): (steps, np.ones(50)),
            member: (steps, np.full(50, reals[0])),
        },
        lengths={"loss": 50},
        findings=[
            Finding(
                step=ints[0],
                kind=text(),
                severity=sev,
                signal=sig,
                value=reals[1],
                baseline=reals[2],
                evidence={text(): text(), "advice": [{"action": text(), "how": text(), "source": text()}]},
                cause=text(),
                advice=text(),
            )
            for sev, sig in (("critical", "loss"), ("warning", member), ("info", "nowhere"))
        ],
        decisions=[
            Decision(step=ints[1], action="skip", reason=text(), by=text()),  # type: ignore[arg-type]
            Decision(step=ints[2], action="rollback", reason=text(), onset=ints[3], restored_step=ints[4]),
            Decision(step=ints[5], action="abort", reason=text()),
        ],
        snapshots=[{"step": ints[6], "path": text(), "checksum": text(), "created": reals[3]}],
        problems=[text()],
    )
    curve = Curve(
        recipe=text(),
        size=text(),
        n_params=ints[7],
        lr_sensitivity=reals[0],
        vs_baseline=reals[1],
        best_lr=reals[2],
        best_loss=reals[3],
        init_loss=reals[0],
        lr_range=(reals[1], reals[2]),
        lrs=(1e-3, 1e-2),
        losses=(reals[0], reals[1]),
        max_attn_logit=(None, reals[2]),
        router_z=(reals[3], None),  # router values: the recipe and size texts go through the router table too
        load_imbalance=(None, reals[0]),
        dead_experts=(reals[1], reals[2]),
        diverged=ints[0],
        errors=ints[1],
    )
    view = Scaling(
        recipe=text(),
        lr=reals[0],
        sizes=(text(), text()),
        n_params=(1, max(2, ints[7])),
        max_attn_logit=(reals[1], None),
        grad_norm=(reals[2], reals[3]),
        logit_fit=(reals[0], reals[1]),
        grad_norm_fit=None,
        divergence_logit=reals[2],
        predicted_divergence_params=reals[3],
        reach=text(),
    )
    row = {
        "run_id": text(),
        "status": text(),
        "lr": reals[0],
        "seed": ints[2],
        "val_loss": reals[1],
        "max_attn_logit": reals[2],
        "steps_done": ints[3],
        "wall_s": reals[3],
        "error": text(),
    }
    sweep = SweepData(
        name=text(),
        path=Path(text()),
        meta={text(): text()},
        rows=[row],
        curves=[curve],
        scaling=[view],
        problems=[text()],
    )
    with _stub_plotly():
        page = build_page([run], [text()], sweeps=[sweep])
    assert "<x-" not in page
    parsed = _Elements(page)
    assert parsed.tags() <= KEEL_TAGS and parsed.handlers() == [] and parsed.script_urls() == []
    assert parsed.outside_links() == []


# ---- stores the report cannot read: one clear error or a note, never a traceback ------------------------------


def test_a_run_folder_named_with_html_is_shown_as_text(tmp_path):
    run = make_run_store(tmp_path / RUN_NAME, steps=20, spike_at=None, skip_at=None)
    page = write_report([run], tmp_path / "report.html").read_text()
    assert "onerror" in page and _Elements(page).tags() <= KEEL_TAGS and "<img" not in page


def test_a_store_that_is_not_sqlite_is_a_note_or_one_error_line(tmp_path, capsys):
    good = make_run_store(tmp_path / "good", steps=20, spike_at=None, skip_at=None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.sqlite").write_text("<script>not a database</script>" * 100)
    page = write_report([good, bad], tmp_path / "report.html").read_text()
    assert "run.sqlite: not an SQLite store (file is not a database)" in page and "<script>not" not in page
    assert main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keel report: error: no keel run store among") and err.count("\n") == 1


@pytest.mark.parametrize("table", ["findings", "decisions", "snapshots"])
def test_a_store_missing_a_table_shows_the_rest_with_a_note(tmp_path, table):
    run = make_run_store(tmp_path / "run", steps=20, spike_at=None, skip_at=None)
    conn = sqlite3.connect(run / "run.sqlite")
    conn.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    page = write_report([run / "run.sqlite"], tmp_path / "report.html").read_text()
    assert f"{table} could not be read (StoreError: " in page and f"has no table &#x27;{table}&#x27;" in page
    assert "<h2>Timelines</h2>" in page


def test_a_store_without_signals_is_skipped_with_a_note_or_one_error_line(tmp_path, capsys):
    run = make_run_store(tmp_path / "run", steps=20, spike_at=None, skip_at=None)
    conn = sqlite3.connect(run / "run.sqlite")
    conn.execute("DROP TABLE signals")
    conn.commit()
    conn.close()
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "a store of a kind this report does not show yet" in err and err.count("\n") == 1


def test_a_store_missing_a_column_shows_the_rest_with_a_note(tmp_path):
    run = make_run_store(tmp_path / "run", steps=20, spike_at=None, skip_at=None)
    conn = sqlite3.connect(run / "run.sqlite")
    conn.execute("ALTER TABLE findings DROP COLUMN cause")
    conn.execute("ALTER TABLE snapshots RENAME COLUMN step TO at")
    conn.commit()
    conn.close()
    page = write_report([run], tmp_path / "report.html").read_text()
    assert "findings could not be read (StoreError: " in page and "lacks the column(s) cause" in page
    assert "snapshots could not be read (StoreError: " in page and "lacks the column(s) step" in page
    assert "<h2>Timelines</h2>" in page


def test_no_readable_path_at_all_is_one_report_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "run.sqlite").write_bytes(b"\x00" * 4096)
    with pytest.raises(ReportError, match="not an SQLite store"):
        write_report([tmp_path / "x"], tmp_path / "report.html")


# ---- whole stores, whatever they hold: the report writes a page (never raises) with nothing but keel's markup ----

JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
SQL = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.binary(max_size=6),
    JSON.map(json.dumps),
)
RUN_TABLES = {"meta": 2, "signals": 3, "findings": 9, "decisions": 6, "snapshots": 4}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.fixed_dictionaries({t: st.lists(st.tuples(*[SQL] * n), max_size=5) for t, n in RUN_TABLES.items()}),
    changes=st.lists(
        st.tuples(
            st.sampled_from(["recipes", "scaling"]),
            st.integers(0, 3),
            st.sampled_from(
                [
                    "name",
                    "recipe",
                    "size",
                    "lrs",
                    "losses",
                    "max_attn_logit",
                    "n_params",
                    "lr_range",
                    "best_lr",
                    "init_loss",
                    "sizes",
                    "grad_norm",
                    "logit_exponent",
                    "logit_log10_prefactor",
                    "predicted_divergence_params",
                    "divergence_logit",
                    "reach",
                ]
            ),
            JSON | st.lists(st.floats() | st.integers(), max_size=3),
        ),
        max_size=6,
    ),
)
def test_any_crafted_run_and_sweep_store_gives_a_page_of_keel_markup_only(tmp_path_factory, rows, changes):
    root = tmp_path_factory.mktemp("stores")
    rows["signals"].append((0, "loss", 1.0))
    run = crafted(root / "run" / "run.sqlite", COLUMNS, rows).parent
    summary = sweep_summary()
    for part, i, name, value in changes:
        entries = summary[part]
        entries[i % len(entries)][name] = value
    sweep = make_sweep_store(root / "sweep", summary=summary)
    with _stub_plotly():
        page = write_report([run, sweep], root / "report.html").read_text()
    parsed = _Elements(page)
    assert parsed.tags() <= KEEL_TAGS and parsed.handlers() == [] and parsed.script_urls() == []
    assert parsed.outside_links() == []
