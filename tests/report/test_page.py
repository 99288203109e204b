"""write_report: one self-contained file, escaped data, tolerant of stores it cannot show, no torch."""

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from keel.cli import main
from keel.report import ReportError, write_report
from tests.report.stores import make_run_store


def _payload(page: str) -> dict:
    blob = re.search(r"<script type='application/json' id='keel-data'>(.*?)</script>", page, re.S).group(1)
    return json.loads(blob.replace("<\\/", "</"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run_store(root / "bare", policy="observe", skip_at=None)
    make_run_store(root / "guarded", seed=1, rollback=(100, 160), nan_at=200)
    return root


def test_report_is_self_contained_and_holds_every_run(runs, tmp_path):
    out = write_report([runs / "bare", runs / "guarded"], tmp_path / "r" / "report.html")
    page = out.read_text()
    assert out.parent.is_dir() and page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']?https?:""", page)  # no CDN, works offline
    assert "plotly.js v" in page and page.count("<script") == 4  # hook, data, plotly, report
    data = _payload(page)
    assert [r["name"] for r in data["runs"]] == ["bare", "guarded"]
    assert len(data["charts"]) == 6 and all(f"id='{c['id']}'" in page for c in data["charts"])
    assert {(s["run"], s["key"]) for s in data["series"]} >= {(0, "loss"), (1, "loss"), (1, "grad/norm")}
    assert "1 skip, 1 rollback" in page and "3 snapshot(s)" in page


def test_store_text_is_escaped(runs, tmp_path):
    page = write_report([runs], tmp_path / "report.html").read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;not markup&lt;/b&gt;" in page


def test_a_folder_of_runs_expands_and_unknown_store_kinds_are_skipped_with_a_note(runs, tmp_path):
    other = tmp_path / "sweep.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE sweep_runs (recipe TEXT, lr REAL, final_loss REAL)")
    conn.commit()
    conn.close()
    page = write_report([runs, other], tmp_path / "report.html").read_text()
    assert [r["name"] for r in _payload(page)["runs"]] == ["bare", "guarded"]
    assert "does not show yet (tables: sweep_runs); skipped" in page


def test_a_missing_path_is_an_error_not_a_report_without_that_run(runs, tmp_path):
    with pytest.raises(ReportError, match=r"runs-typo: no such file or folder; allowed: run folders"):
        write_report([runs / "bare", tmp_path / "runs-typo"], tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()
    assert main(["report", str(runs / "bare"), str(tmp_path / "runs-typo"), "-o", str(tmp_path / "r.html")]) == 2


def test_no_run_store_at_all_is_an_error(tmp_path):
    with pytest.raises(ReportError, match="no store here"):
        write_report([tmp_path], tmp_path / "report.html")


def test_an_old_store_schema_still_renders(runs, tmp_path):
    old = tmp_path / "old"
    make_run_store(old, steps=50, spike_at=None, skip_at=None)
    conn = sqlite3.connect(old / "run.sqlite")
    conn.execute("DROP TABLE decisions")
    # the table as it was before decisions had onset and restored_step columns: they read as empty
    conn.execute("CREATE TABLE decisions (step INTEGER, action TEXT, reason TEXT, actor TEXT)")
    conn.execute("INSERT INTO decisions VALUES (7, 'skip', 'critical loss_spike', 'keel')")
    conn.commit()
    conn.close()
    page = write_report([old], tmp_path / "report.html").read_text()
    assert "could not be read" not in page and "<summary>1 skip</summary>" in page
    assert "<tr><td>7</td><td>skip</td><td>keel</td><td></td><td></td><td>critical loss_spike</td></tr>" in page
    assert len(_payload(page)["charts"]) == 6


def test_cli_writes_and_prints_the_path_and_fails_cleanly(runs, tmp_path, capsys):
    out = tmp_path / "x.html"
    assert main(["report", str(runs / "bare"), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    assert main(["report", str(tmp_path / "nothing"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keel report: error: ") and err.count("\n") == 1


def test_the_report_imports_no_torch(runs, tmp_path):
    code = (
        "import sys; from keel.report import write_report; "
        f"write_report([{str(runs)!r}], {str(tmp_path / 'r.html')!r}); print('torch' in sys.modules)"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.strip() == "False", proc.stderr


def test_series_encoding_compacts_even_steps_and_round_trips_irregular_ones(tmp_path):
    import base64

    import numpy as np

    from keel.report.charts import plan_charts
    from keel.report.page import _series
    from keel.report.run_data import RunData

    even = RunData(name="a", path=tmp_path, series={"loss": (np.arange(0, 50, 5), np.linspace(3, 2, 10))})
    odd_steps = np.array([0, 1, 2, 10, 11, 500])
    odd_values = np.array([3, 2.9, np.nan, 2.5, np.inf, 2.0])
    odd = RunData(name="b", path=tmp_path, series={"loss": (odd_steps, odd_values)})
    encoded = _series([even, odd], plan_charts([even, odd])[0])
    assert {k: encoded[0][k] for k in ("start", "stride", "n")} == {"start": 0, "stride": 5, "n": 10}
    assert "steps" not in encoded[0]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded[1]["steps"]), "<i4"), odd_steps)
    values = np.frombuffer(base64.b64decode(encoded[1]["values"]), "<f4")
    np.testing.assert_array_equal(values, odd_values.astype("<f4"))


def test_the_guard_s_named_cause_leads_the_run_s_diagnosis(tmp_path):
    from keel.store import RunWriter

    run = make_run_store(tmp_path / "bare", policy="observe")
    with RunWriter(run) as w:
        w.set_meta(
            {
                "diagnosis": [
                    {
                        "kind": "attention_logit_growth",
                        "title": "Attention-logit growth <q>",
                        "when": "first seen at step 5, critical at step 20; "
                        "the loss degraded at step 56, 51 steps later",
                    },
                    {"kind": "softmax_collapse", "title": "Softmax collapse", "when": "first seen at step 9"},
                ]
            }
        )
    page = write_report([run], tmp_path / "report.html").read_text()
    card = re.search(r"<div class='card named'>(.*?)</div>", page, re.S).group(1)
    assert (
        "<li><b>Attention-logit growth &lt;q&gt;</b> — first seen at step 5, critical at step 20; "
        "the loss degraded at step 56, 51 steps later</li>"
    ) in card  # store text escaped, as everywhere
    assert "<li><b>Softmax collapse</b> — first seen at step 9</li>" in card
    assert page.index("card named") < page.index("loss spike")  # the cause first, then the findings' cards


def test_a_report_that_cannot_be_written_whole_leaves_the_old_one_and_names_the_file(runs, tmp_path):
    # Reviewer W (session 15): on a full disk `keel report … -o x.html` left a truncated x.html (a report that had
    # been there was lost) and said only "[Errno 28] No space left on device". The file-size limit below makes
    # the OS refuse the write past 64 kB (EFBIG) as a full disk refuses it (ENOSPC); the page is ~4 MB.
    out = tmp_path / "report.html"
    out.write_text("the report of yesterday")
    limit = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
        "from keel.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", limit, "report", str(runs / "bare"), "-o", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"keel report: error: {out}: File too large")
    assert out.read_text() == "the report of yesterday"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["report.html"]  # no partial file left


@pytest.mark.parametrize("target", ["store", "log"])
def test_the_report_never_writes_over_a_store_or_a_log_it_reads(runs, tmp_path, target):
    # Reviewer W (session 15): `keel report RUN -o RUN/run.sqlite` and `keel report train.csv -o train.csv` replaced
    # the run store / the training log with the HTML page, exit status 0.
    log = tmp_path / "train.csv"
    log.write_text("step,loss\n" + "".join(f"{s},{3 - s / 100}\n" for s in range(40)))
    store = tmp_path / "run" / "run.sqlite"
    make_run_store(store.parent, steps=40, spike_at=None, skip_at=None)
    given, out = (store.parent, store) if target == "store" else (log, log)
    before = out.read_bytes()
    with pytest.raises(ReportError, match=rf"{out}: .*the report would replace it; allowed: another file"):
        write_report([given], out)
    assert out.read_bytes() == before


def test_a_report_path_that_is_a_symlink_updates_the_file_it_points_to(runs, tmp_path):
    # eec622a writes through a file beside the report and renames it over: a link (report.html -> a served folder)
    # must stay a link, and the file it points to get the page, as a plain write did.
    served = tmp_path / "www" / "report.html"
    served.parent.mkdir()
    served.write_text("old")
    link = tmp_path / "report.html"
    link.symlink_to(served)
    write_report([runs / "bare"], link)
    assert link.is_symlink() and served.read_text().startswith("<!DOCTYPE html>")
