"""The report page: run stores → one self-contained HTML file (plotly.js inlined, no network, works offline).

`write_report` is what `keel report` and `keel demo` call. The page opens with one screen of what a person wants
first (`keel.report.overview`): the runs compared, their named causes, the loss chart with its marks. Then the
diagnosis cards (one card for the runs that share it), the other timelines with findings, skips, rollbacks and
snapshots marked on them, the runs' metadata, and the decisions and snapshots tables; several runs are overlaid
on the same charts for comparison. A sweep store adds its
section (`keel.report.sweep_section`): LR-sensitivity tables, the scaling view and their figures. Everything
on the page is built here from the stores' data, escaped; nothing from a store is inserted as markup.
"""

from __future__ import annotations

import base64
import colorsys
import html
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from keel._core import keys
from keel._core.errors import KeelError
from keel._core.files import write_whole
from keel._core.progress import step_progress
from keel.doctor.mlflow_log import db_run_path
from keel.doctor.store_log import is_sqlite
from keel.report import charts as _charts
from keel.report import overview as _overview
from keel.report import sections as _sections
from keel.report.chart_text import chart_block
from keel.report.downsample import downsample_minmax
from keel.report.eval_stability_section import eval_stability_section
from keel.report.labels import run_labels
from keel.report.logs import logs_as_runs
from keel.report.run_data import RunData, load_run
from keel.report.sources import Source, classify, expand, logs_left_out
from keel.report.sweep_data import SweepData, load_sweep_data
from keel.report.sweep_section import sweep_section
from keel.store import STORE_NAME, StoreError, store_path

PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
# Hues (degrees) a run may be drawn in once the palette is too short: red, orange and amber are the marks'
# (critical ×, warning ▲, abort lines), so no run takes them.
RUN_HUES = (75.0, 325.0)


def run_colors(count: int) -> list[str]:
    """A color per run: `PALETTE` for up to its length; beyond, as many distinct colors, spread over `RUN_HUES`
    by the golden angle (neighbouring runs far apart) in three lightness levels.

    Cycling the palette drew run 0 and run 8 (and 16 …) in the same blue: in a report of 50 runs, one color stood
    for seven of them in every chart, legend and table.

    Example:
        >>> run_colors(2)
        ['#1f77b4', '#2ca02c']
        >>> len(set(run_colors(50)))
        50
    """
    if count <= len(PALETTE):
        return list(PALETTE[:count])
    low, high = RUN_HUES
    colors = []
    for i in range(count):
        hue = low + ((i * 0.6180339887) % 1.0) * (high - low)
        lightness = (0.35, 0.5, 0.62)[i % 3]
        red, green, blue = colorsys.hls_to_rgb(hue / 360.0, lightness, 0.75)
        colors.append(f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}")
    return colors


# The head script runs before anything else, so errors of plotly.js and of the page script are counted
# (the browser test reads them back from the page).
ERROR_HOOK = """window.__keel = {errors: [], rendered: 0, done: false};
window.addEventListener("error", function (e) {
  window.__keel.errors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || "error"));
}, true);
window.addEventListener("unhandledrejection", function (e) {
  window.__keel.errors.push("rejection: " + e.reason);
});
(function () { var ce = console.error; console.error = function () {
  window.__keel.errors.push(Array.prototype.map.call(arguments, String).join(" "));
  ce.apply(console, arguments);
}; })();"""


ALLOWED = "run folders, run.sqlite files, sweep folders, folders that hold them, or training logs keel doctor reads"


class ReportError(KeelError):
    """No run store among the paths given to the report."""


def plotly_js() -> tuple[str, str]:
    """(plotly.min.js source, its version), from the ``plotly`` package (a dependency of keel)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise ReportError("the HTML report needs plotly, a dependency of keel: pip install plotly") from None
    source = get_plotlyjs()
    head = source[:200]
    version = head.split("plotly.js v", 1)[1].split()[0] if "plotly.js v" in head else "?"
    return source, version


def write_report(run_dirs: list[str | Path] | str | Path, out_path: str | Path, *, progress: bool = False) -> Path:
    """Write one self-contained HTML report of the given runs and sweeps.

    Args:
        run_dirs: Run folders (or their ``run.sqlite``); a folder without a store stands for the run stores
            one or two levels below it (``runs/demo``). A sweep folder (or its ``sweep.sqlite``) adds the sweep's
            section, drawn from its store. Any other path is read as a training log by `keel doctor` and drawn as a
            run, with the doctor's findings (`keel.report.logs`). A store of a kind the report does not show is
            skipped with a note. A run given twice is shown once. Runs are labelled by the shortest end of their
            path that is unique among them (`keel.report.run_labels`): ``A/keel`` and ``B/keel``, or ``keel`` alone.
        out_path: The HTML file to write (its folder is created).
        progress: Show a progress bar over the stores and logs read on stderr, when stderr is a terminal
            (`keel report`).

    Returns:
        The path written.

    Raises:
        ReportError: A path does not exist or holds neither a store nor a log (one message names them all), none
            is a readable run or sweep store, or plotly is not installed.

    Example:
        >>> write_report(["runs/demo/bare", "runs/demo/guarded"], "runs/demo/report.html")  # doctest: +SKIP
        PosixPath('runs/demo/report.html')
    """
    paths = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    missing = [str(p) for p in paths if not Path(p).exists() and db_run_path(Path(p)) is None]  # mlflow.db/<run>
    if missing:  # a typo must not quietly give a report with a run left out
        raise ReportError(f"{', '.join(missing)}: no such file or folder; allowed: {ALLOWED}")
    overwritten = _read_by_the_report(Path(out_path), paths)
    if overwritten is not None:
        raise ReportError(f"{out_path}: {overwritten}: the report would replace it; allowed: another file (*.html)")
    classified = [classify(path) for path in _distinct(expand(paths))]
    files = len(classified) + sum(not source.store for source in classified)  # a log is read, then its store
    with (
        tempfile.TemporaryDirectory(prefix="keel-report-") as scratch,  # the stores of logs, read whole below
        step_progress((0, files), "keel report", enabled=progress, unit="file") as reached,
    ):
        done = itertools.count(1)

        def advance() -> None:
            reached(next(done))

        sources = logs_as_runs(classified, Path(scratch), on_read=advance)
        empty = [source.note for source in sources if not source.store]
        if empty:  # a typo'd or empty folder must not quietly give a report with a run left out either
            raise ReportError("; ".join(empty) + "; allowed: " + ALLOWED)
        runs, run_paths, sweeps, notes = _load(sources, on_read=advance)
    notes += logs_left_out(paths)
    if not runs and not sweeps:
        raise ReportError(
            "no keel run store among " + ", ".join(str(p) for p in paths) + (f" ({'; '.join(notes)})" if notes else "")
        )
    for run, label in zip(runs, run_labels([Path(os.path.abspath(p)) for p in run_paths]), strict=True):
        run.name = label
    out = Path(out_path)
    write_whole(out, build_page(runs, notes, sweeps=sweeps))
    return out


def _read_by_the_report(out: Path, paths: list[str | Path]) -> str | None:
    """What ``out`` is when writing the page there would destroy what reports are made from (``keel report RUN -o
    RUN/run.sqlite``, ``keel report train.csv -o train.csv`` replaced the store or the log with the page); None when
    it is a new file or another one."""
    if not out.is_file():
        return None
    if is_sqlite(out):
        return "an SQLite file (a run or sweep store, an MLflow database)"
    if any(out.resolve() == Path(p).resolve() for p in paths):
        return "a log this report reads"
    return None


def _load(
    sources: list[Source], *, on_read: Callable[[], None] = lambda: None
) -> tuple[list[RunData], list[Path], list[SweepData], list[str]]:
    """The runs and sweeps of ``sources``, what each run is labelled by (its folder, a store file not named
    run.sqlite, or the log it was written from), and a note for each source that could not be read; ``on_read``
    is called after each source (a progress bar's callback)."""
    notes: list[str] = []
    runs: list[RunData] = []
    run_paths: list[Path] = []
    sweeps: list[SweepData] = []
    for source in sources:
        path = source.path
        if source.kind not in ("run", "sweep"):
            notes.append(source.note)  # the extension point: see keel.report.sources
            continue
        try:
            if source.kind == "run":
                runs.append(load_run(path, keep=_keep, series=source.series))
                if source.log is not None:  # its store is a scratch folder: the log is what the reader knows
                    runs[-1].path = source.log
                run_paths.append(source.log or (path.parent if path.name == STORE_NAME else path))
            else:
                sweeps.append(load_sweep_data(path))
        except (StoreError, FileNotFoundError) as exc:  # classified a moment ago, unreadable now: a note
            notes.append(str(exc))
        on_read()
    return runs, run_paths, sweeps, notes


def build_page(runs: list[RunData], notes: list[str] | None = None, *, sweeps: Sequence[SweepData] = ()) -> str:
    """The report's HTML for already loaded runs and sweeps."""
    notes = list(notes or [])
    sections = [sweep_section(sweep, i) for i, sweep in enumerate(sweeps)]
    colors = run_colors(len(runs))
    charts, left_out = _charts.plan_charts(runs)
    if left_out:
        notes.append(
            f"{len(left_out)} more signals have no chart (the page keeps {_charts.MAX_CHARTS}): " + ", ".join(left_out)
        )
    marks = _charts.marks(runs, charts)
    payload = {
        "runs": [{"name": r.name, "color": c} for r, c in zip(runs, colors, strict=True)],
        "charts": [
            {"id": c.id, "title": c.title, "keys": c.keys, "layers": c.layers, "log_y": c.log_y, "main": c.main}
            for c in charts
        ],
        "series": _series(runs, charts),
        "xrange": _step_range(runs),
        "marks": marks,
        "figures": [figure for _, figures in sections for figure in figures],
    }
    js, version = plotly_js()
    script = resources.files("keel.report").joinpath("report.js").read_text(encoding="utf-8")
    css = resources.files("keel.report").joinpath("report.css").read_text(encoding="utf-8")
    names = ", ".join([r.name for r in runs] + [s.name for s in sweeps])
    counts = [f"{len(runs)} run(s)"] * bool(runs) + [f"{len(sweeps)} sweep(s)"] * bool(sweeps)
    extra = ["<div class='extra'>" + "\n".join(markup for markup, _ in sections) + "</div>"] if sections else []
    body = [
        "<main>",
        "<h1>keel stability report</h1>",
        f"<div class='sub'>{' and '.join(counts)}: {html.escape(names)} · generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} · keel {html.escape(_keel_version())}</div>",
        "<div class='notes'>" + "".join(f"<p>{html.escape(n)}</p>" for n in notes) + "</div>",
        # A sweep given alone: its section is the page.
        *(_run_parts(runs, colors, charts, marks, extra) if runs else extra),
        f"<footer>Self-contained: plotly.js {html.escape(version)} is inlined; the page needs no network.</footer>",
        "</main>",
        "<pre id='keel-status'></pre>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>keel report: {html.escape(names)}</title>"
        f"<script>{ERROR_HOOK}</script><style>{css}</style></head><body>"
        + "\n".join(body)
        + f"\n<script type='application/json' id='keel-data'>{_json_for_script(payload)}</script>"
        + f"\n<script>{_script_safe(js)}</script>\n<script>{_script_safe(script)}</script>\n</body></html>\n"
    )


def _run_parts(
    runs: list[RunData],
    colors: list[str],
    charts: list[_charts.Chart],
    marks: dict[str, list[dict[str, Any]]],
    extra: list[str],
) -> list[str]:
    # The first screen: runs compared, named causes, the loss chart with its marks (keel.report.overview).
    loss = next((c for c in charts if keys.LOSS in c.keys), charts[0] if charts else None)
    rl = [c for c in charts if c is not loss and _charts.is_preference_rl(c)]
    timelines = [c for c in charts if c is not loss and not _charts.is_preference_rl(c)]

    def block(chart: _charts.Chart) -> str:
        return chart_block(chart, runs, marks[chart.id])

    sections = [
        ("diagnosis", "Diagnosis", [_overview.shared_cards(runs, colors)]),
        ("timelines", "Timelines", [block(c) for c in timelines]),
        ("preference-rl", "Preference and RL signals", [block(c) for c in rl]),
        ("runs", "Runs", [_sections.metadata(r) for r in runs]),
        (
            "decisions",
            "Decisions and snapshots",
            [
                f"<h3>{html.escape(r.name)}</h3>{_sections.decisions_table(r)}{_sections.snapshots_table(r)}"
                for r in runs
            ],
        ),
    ]
    shown = [(anchor, title, "".join(content)) for anchor, title, content in sections if content]
    parts = {anchor: f"<section id='{anchor}'><h2>{title}</h2>{content}</section>" for anchor, title, content in shown}
    return [
        _jump_links([(anchor, title) for anchor, title, _ in shown]),
        _overview.overview(runs, colors, block(loss) if loss is not None else None),
        parts["diagnosis"],
        parts.get("timelines", ""),
        parts.get("preference-rl", ""),
        eval_stability_section(runs),
        *extra,
        parts["runs"],
        parts["decisions"],
    ]


def _jump_links(sections: list[tuple[str, str]]) -> str:
    """The page's first tab stops: links to its sections, shown while one has the focus (report.css). Without
    them a keyboard went through every chart's toolbar (7 buttons) and numbers to reach the runs' tables: 190 tab
    stops on a page of 24 charts."""
    links = " · ".join(f"<a href='#{anchor}'>{title.lower()}</a>" for anchor, title in sections)
    return f"<nav class='jump' aria-label='sections of the report'>jump to: {links}</nav>"


# Points the page embeds over all its charted series: 50 runs x 7 signals x 20k steps made a 37 MB page (18 s to
# load); each series keeps at least MIN_SERIES_POINTS.
PAGE_POINTS, MIN_SERIES_POINTS = 2_000_000, 4_000


def _series(runs: list[RunData], charts: list[_charts.Chart]) -> list[dict[str, Any]]:
    """The charted series, compactly: values as base64 float32; steps as ``start``/``stride`` when they are
    evenly spaced (every step logged: half the bytes of a long run), else base64 int32 (float64 beyond)."""
    wanted = {k for c in charts for k in c.keys + c.layers}
    charted = sum(key in wanted for run in runs for key in run.series)
    cap = max(MIN_SERIES_POINTS, PAGE_POINTS // max(1, charted))
    out = []
    for i, run in enumerate(runs):
        for key, (steps, values) in run.series.items():
            if key not in wanted:
                continue
            if len(steps) > cap:  # min/max: a one-step spike stays on the page
                steps, values = downsample_minmax(steps, values, cap)
            entry: dict[str, Any] = {"run": i, "key": key, "n": int(len(steps)), "values": _b64(_float32(values))}
            diffs = np.diff(steps)
            if len(steps) and (len(diffs) == 0 or (diffs[0] > 0 and np.all(diffs == diffs[0]))):
                entry.update(start=int(steps[0]), stride=int(diffs[0]) if len(diffs) else 1)
            elif len(steps) and int(np.max(np.abs(steps))) < 2**31:
                entry.update(steps=_b64(np.asarray(steps, dtype="<i4")), steps_dtype="i4")
            else:
                entry.update(steps=_b64(np.asarray(steps, dtype="<f8")), steps_dtype="f8")
            out.append(entry)
    return out


def _float32(values: np.ndarray) -> np.ndarray:
    """``values`` as float32, finite values beyond its range held at its largest: a 1e300 spike stays a spike
    on the chart instead of becoming an infinity (drawn as a gap)."""
    big = float(np.finfo(np.float32).max)
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), np.clip(values, -big, big), values).astype("<f4")


def _step_range(runs: list[RunData]) -> list[int]:
    """[first, last] step over every run's series: the x range all charts share."""
    firsts = [int(s[0]) for r in runs for s, _ in r.series.values() if len(s)]
    lasts = [int(s[-1]) for r in runs for s, _ in r.series.values() if len(s)]
    if not firsts:
        return [0, 1]
    return [min(firsts), max(max(lasts), min(firsts) + 1)]


def _keep(key: str) -> bool:
    """The signals the report reads: all but per-parameter families (hundreds of series, never charted)."""
    return _charts.base_of(key) not in _charts.PER_PARAM


def _distinct(paths: list[Path]) -> list[Path]:
    """``paths`` without repeats of a store already listed (``runs/a`` and ``runs/a/run.sqlite``; ``runs`` and
    ``runs/a``): a run given twice is shown once. Absolute, not resolved: a symlinked run keeps its own name."""
    seen: set[str] = set()
    out = []
    for path in paths:
        key = os.path.abspath(store_path(path))
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


# Inside <script> the HTML parser, not JSON, decides where the element ends: "</script" ends it early and
# "<!--<script" makes it swallow the next "</script>". With every <, > and & written as a \u escape no markup
# can appear in the data; JSON.parse reads the same strings. (json.dumps already escapes non-ASCII, U+2028 and
# U+2029 included.)
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def _json_for_script(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).translate(_SCRIPT_SAFE)


def _script_safe(source: str) -> str:
    return source.replace("</script", "<\\/script")


def _keel_version() -> str:
    import keel

    return keel.__version__
