"""A sweep's section is built by the report from the sweep store (its rows and stored summary), never from a file
found next to it (issue 12, item 9); a store it cannot fully read gives a note, never a traceback."""

from __future__ import annotations

import html
import json
import math
import re
import sqlite3

import pytest

from keel.cli import main
from keel.report import write_report
from keel.report.sweep_data import load_sweep_data
from keel.report.sweep_section import sweep_section
from tests.report.browser import chromium_binary, load
from tests.report.stores import SWEEP_RUNS, make_run_store, make_sweep_store, sweep_summary


def _payload(page: str) -> dict:
    blob = re.search(r"<script type='application/json' id='keel-data'>(.*?)</script>", page, re.S).group(1)
    return json.loads(blob)


def _section(page: str) -> str:
    return page[page.index("<section class='sweep'>") : page.index("</section>")]


def test_a_sweep_folder_is_drawn_from_its_store_and_an_html_file_there_is_ignored(tmp_path):
    sweep = make_sweep_store(tmp_path / "sweep", summary=sweep_summary())
    # What keel sweep used to leave there and keel report pasted into the page as it was.
    (sweep / "sweep_section.html").write_text("<section><script>document.title='pwned'</script><img src=x>")
    page = write_report([sweep], tmp_path / "report.html").read_text()
    assert "pwned" not in page and "<img" not in page and "<h2>Runs</h2>" not in page
    section = _section(page)
    assert "<h2>LR sensitivity sweep: sweep</h2>" in section
    assert (
        "<tr><td>tiny</td><td>115328</td><td>0.230</td><td>1.0x</td><td>1e-03</td><td>2.470</td>"
        "<td>1e-03 … 1e-03</td><td>4.9 → 6.7e+04</td><td>0</td><td>0</td></tr>"
    ) in section
    assert "<td>small</td><td>427264</td><td>0.000</td><td>—</td>" in section  # no baseline ratio: a dash
    assert "<td>logit ∝ N^0.29</td><td>reaches 124 (calibrated on baseline) at ≈7.6e+09 params</td>" in section
    assert "<summary>8 run(s): 6 done, 1 diverged, 1 error</summary>" in section
    assert "<td>RuntimeError: boom</td>" in section  # a traceback's last line

    figures = _payload(page)["figures"]
    assert [f["title"] for f in figures] == [
        "final loss vs LR: baseline",
        "final loss vs LR: qk_norm",
        "max attention logit vs LR: baseline",
        "max attention logit vs LR: qk_norm",
        "max attention logit vs size at lr 0.001",
        "gradient norm vs size at lr 0.001",
    ]
    assert all(  # named for a screen reader: the figure's SVG is hidden from it
        f"<div class='chart fig' id='{f['id']}' role='figure' aria-label='chart: {html.escape(f['title'])}'></div>"
        in section
        for f in figures
    )
    loss = figures[0]["traces"]
    assert [(t["name"], t["x"], t["y"]) for t in loss if t["legend"]] == [
        ("tiny  LRS 0.230", [1e-3, 1e-1], [2.47, 2.93]),
        ("small  LRS 1.660", [1e-3, 1e-1], [2.28, 5.6]),
    ]
    assert figures[0]["y_range"] == figures[1]["y_range"]  # the recipes' panels share the loss axis
    fit = next(t for t in figures[4]["traces"] if t["name"] == "baseline ∝ N^0.29")
    assert fit["y"][0] == pytest.approx(10 ** (-0.78 + 0.29 * math.log10(115_328)))
    assert fit["x"][-1] == pytest.approx(4 * 427_264)  # 7.6e9 is past 10⁴× the largest size: not drawn out to
    assert any(t["name"] == "divergence logit 124" for t in figures[4]["traces"])


def test_a_sweep_and_runs_share_one_page_sweep_after_the_timelines(tmp_path):
    run = make_run_store(tmp_path / "run", steps=30, spike_at=None, skip_at=None)
    sweep = make_sweep_store(tmp_path / "sweep", summary=sweep_summary())
    page = write_report([run, sweep / "sweep.sqlite"], tmp_path / "report.html").read_text()
    assert "1 run(s) and 1 sweep(s): run, sweep" in page
    where = page.index("<section class='sweep'>")
    assert page.index("<h2>Timelines</h2>") < where < page.index("<h2>Decisions and snapshots</h2>")
    assert len(_payload(page)["charts"]) == 6 and len(_payload(page)["figures"]) == 6


def test_a_sweep_without_a_stored_summary_lists_its_runs_with_a_note(tmp_path):
    sweep = make_sweep_store(tmp_path / "sweep")
    page = write_report([sweep], tmp_path / "report.html").read_text()
    assert "no summary stored: `keel sweep` stores one when it finishes" in page
    assert "<summary>8 run(s): 6 done, 1 diverged, 1 error</summary>" in page and _payload(page)["figures"] == []


def test_a_sweep_that_changed_after_its_summary_was_stored_says_so(tmp_path):
    sweep = make_sweep_store(
        tmp_path / "sweep",
        runs=[*SWEEP_RUNS, ("qk_norm", "small", 0.3, "running", None, None)],
        summary=sweep_summary(),
    )
    page = write_report([sweep], tmp_path / "report.html").read_text()
    assert (
        "the sweep changed after its summary was stored (its runs now: 1 diverged, 6 done, 1 error, 1 running)" in page
    )
    assert len(_payload(page)["figures"]) == 6  # the stored summary is still shown


@pytest.mark.parametrize(
    ("change", "note"),
    [
        ("DELETE FROM runs", "this sweep has no runs yet"),
        ("ALTER TABLE runs DROP COLUMN status", "runs could not be read (StoreError: "),
        ("UPDATE runs SET lr = 'fast' WHERE rowid = 1", "runs: 1 row(s) of the wrong type left out (first: lr is "),
        (
            "UPDATE runs SET config = '{oops' WHERE rowid = 2",
            "runs: 1 row(s) of the wrong type left out (first: config",
        ),
        ("UPDATE meta SET value = '[1, 2]' WHERE key = 'summary'", "the stored summary is list, not an object"),
        ("UPDATE meta SET value = '{\"recipes\": 5}' WHERE key = 'summary'", "the stored summary&#x27;s &#x27;recipes"),
    ],
)
def test_a_sweep_store_it_cannot_fully_read_gives_a_note(tmp_path, change, note):
    sweep = make_sweep_store(tmp_path / "sweep", summary=sweep_summary())
    conn = sqlite3.connect(sweep / "sweep.sqlite")
    conn.execute(change)
    conn.commit()
    conn.close()
    page = write_report([sweep], tmp_path / "report.html").read_text()
    assert f"<p class='problem'>{note}" in page


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"lrs": [1e-3, "x"]}, "lrs is &#x27;x&#x27;"),
        ({"losses": [2.5]}, "mismatched lengths"),
        ({"lrs": [], "losses": [], "max_attn_logit": []}, "empty"),
        ({"n_params": 1.5}, "n_params is float"),
        ({"name": ["<b>"]}, "name is list"),
        ({"best_loss": float("nan")}, "best_loss is nan"),
    ],
)
def test_summary_entries_of_the_wrong_type_are_left_out_with_a_note(tmp_path, entry, field):
    summary = sweep_summary()
    summary["recipes"][0] |= entry
    sweep = make_sweep_store(tmp_path / "sweep", summary=summary)
    page = write_report([sweep], tmp_path / "report.html").read_text()
    assert "the stored summary&#x27;s &#x27;recipes&#x27;: 1 entr(ies) of the wrong type left out (first: " in page
    assert field in page and page.count("<h3>baseline</h3>") == 1  # the other entries are shown


def test_keel_report_of_a_sweep_that_is_not_sqlite_is_one_error_line(tmp_path, capsys):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.sqlite").write_text("not sqlite")
    assert main(["report", str(tmp_path / "sweep"), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "sweep.sqlite: not an SQLite store" in err and err.count("\n") == 1


@pytest.mark.browser
@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)")
def test_a_sweep_report_draws_every_figure_in_chromium_without_errors(tmp_path):
    sweep = make_sweep_store(tmp_path / "sweep", summary=sweep_summary())
    page = write_report([sweep], tmp_path / "report.html")
    result = load(page, tmp_path / "profile")
    status = result["status"]
    assert status, result["stderr_tail"]
    assert status["errors"] == [] and result["console"] == [], (status["errors"], result["console"])
    assert status["charts"] == 6 and status["rendered"] == 6
    assert result["dom"].count('data-rendered="1"') == 6


def test_the_report_of_a_sweep_imports_no_torch_and_no_proxy_code(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    sweep = make_sweep_store(tmp_path / "sweep", summary=sweep_summary())
    code = (
        "import sys; from keel.report import write_report; "
        f"write_report([{str(sweep)!r}], {str(tmp_path / 'r.html')!r}); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('keel.proxy')))"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.strip() == "[]", proc.stderr


def _moe_summary() -> dict:
    """The stored summary with the router's end signals: the baseline/tiny curve as an MoE recipe's would be."""
    summary = sweep_summary()
    summary["recipes"][0] |= {"router_z": [12.0, 900.0], "load_imbalance": [1.25, 2.0], "dead_experts": [0.0, 3.0]}
    return summary


def _router_part(tmp_path, summary):
    """The sweep section's router table (or "") and router figures, from the store alone (no page)."""
    sweep = load_sweep_data(make_sweep_store(tmp_path / "sweep", summary=summary))
    html, figures = sweep_section(sweep, 0)
    table = html[html.index("<h3>Router at the end") :] if "<h3>Router" in html else ""
    return sweep, table[: table.find("</table>") + 1], {f["title"]: f for f in figures if "vs LR" in f["title"]}


def test_a_sweep_with_router_values_gets_a_router_table_and_router_figures(tmp_path):
    page = write_report([make_sweep_store(tmp_path / "sweep", summary=_moe_summary())], tmp_path / "r.html")
    section = _section(page.read_text())
    assert "<p class='problem'>" not in section
    router = section[section.index("<h3>Router at the end of the run") :]
    router = router[: router.index("</table>")]
    assert router.endswith("<tr><td>baseline</td><td>tiny</td><td>12 / 1.25 / 0</td><td>900 / 2 / 3</td></tr>")
    assert router.count("<tr><td>") == 1  # the curves without router values have no row
    figures = {f["title"]: f for f in _payload(page.read_text())["figures"]}
    z, load = figures["router z vs LR"], figures["load imbalance vs LR"]
    assert [(t["name"], t["y"]) for t in z["traces"]] == [("baseline tiny", [12.0, 900.0])] and z["log_y"]
    assert load["traces"][0]["y"] == [1.25, 2.0]


@pytest.mark.parametrize(
    "entry",
    [
        None,  # sweep_summary() is what a keel before the router fields stored: it must still render, router-free
        {"router_z": None, "load_imbalance": None, "dead_experts": None},  # null: not measured
        {"router_z": [None, None], "load_imbalance": [None, None], "dead_experts": [None, None]},  # a dense model
    ],
)
def test_absent_or_null_router_fields_read_as_not_measured_with_no_router_table(tmp_path, entry):
    summary = sweep_summary() if entry is None else _with(_moe_summary(), entry)
    sweep, table, figures = _router_part(tmp_path, summary)
    assert sweep.problems == [] and len(sweep.curves) == 4 and sweep.curves[0].router_z == (None, None)
    assert table == "" and "router z vs LR" not in figures


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"router_z": "high"}, "router_z is str; allowed: a list"),
        ({"router_z": [1.0, "x"]}, "router_z is 'x'"),
        ({"load_imbalance": [1.5]}, "load_imbalance has 1 values and lrs 2: mismatched lengths"),
        ({"dead_experts": [0.0, 1.0, 2.0]}, "mismatched lengths"),
        ({"dead_experts": {"a": 1}}, "dead_experts is dict; allowed: a list"),
    ],
)
def test_router_fields_of_the_wrong_type_or_length_leave_the_entry_out_with_a_note(tmp_path, entry, field):
    sweep, table, figures = _router_part(tmp_path, _with(_moe_summary(), entry))
    (problem,) = sweep.problems
    assert problem.startswith("the stored summary's 'recipes': 1 entr(ies) of the wrong type left out (first: ")
    assert field in problem and len(sweep.curves) == 3  # the other entries are shown
    assert table == "" and not figures.get("router z vs LR")  # the only MoE curve was the one left out


def test_a_router_value_that_is_null_at_one_lr_is_a_dash_and_a_gap(tmp_path):
    _, table, figures = _router_part(tmp_path, _with(_moe_summary(), {"router_z": [None, 900.0]}))
    assert "<td>— / 1.25 / 0</td><td>900 / 2 / 3</td>" in table
    assert figures["router z vs LR"]["traces"][0]["y"] == [None, 900.0]


def _with(summary: dict, entry: dict) -> dict:
    summary["recipes"][0] |= entry
    return summary


def test_a_curve_whose_every_run_diverged_names_no_best_lr_lr_range_or_lrs(tmp_path):
    # Reviewer W (session 15): such a curve's row read "best lr 1e-03", "lr range 1e-03 … 1e-01" and its legend
    # "LRS 0.000" beside the table's "—".
    summary = sweep_summary()
    curve = next(c for c in summary["recipes"] if (c["name"], c["size"]) == ("qk_norm", "tiny"))
    curve.update(best_loss=5.6, losses=[5.6] * len(curve["losses"]), lr_sensitivity=0.0, sensitivity_vs_baseline=None)
    make_sweep_store(tmp_path / "sweep", summary=summary)
    page = write_report([tmp_path / "sweep"], tmp_path / "r.html").read_text()
    table = page[page.index("<h3>qk_norm</h3>") :]
    cells = re.findall(r"<td>([^<]*)</td>", table[table.index("<td>tiny</td>") :])[:7]
    assert cells[2:] == ["—", "—", "—", "5.600", "—"], cells  # LRS, vs base, best lr, best loss, lr range
    legend = json.dumps("tiny  LRS —")[1:-1]
    assert legend in page or "tiny  LRS —" in page
