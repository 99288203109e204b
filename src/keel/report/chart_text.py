"""A timeline chart's text equivalent: its name on the chart, and the numbers behind it in a table folded under it.

A plotly chart is an SVG of tick labels and paths: a screen reader read out "0 50 100 150 … run00 · loss …" and
nothing of what the lines do, and a hover label (what a mark is: the finding, the skip, the rollback and its
reason) could be read only with a mouse. Under each chart the page folds a table of what it shows: per run and
signal the steps, the last, lowest and highest value and how many were not finite, then every mark with its step
and text. It is read with a screen reader, reached with the keyboard (a <details> is a tab stop, Enter opens it),
and printed opened.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keel.report.charts import Chart
from keel.report.run_data import RunData
from keel.report.sections import MAX_ROWS, esc

MARK_NAMES = {"skip": "skipped step", "snapshot": "snapshot", "rollback": "rollback", "abort": "abort"}


def chart_block(chart: Chart, runs: list[RunData], marks: list[dict[str, Any]]) -> str:
    """The chart's element, named for assistive technology (the SVG inside is hidden from it by report.js), and
    the table of its numbers under it (`numbers`)."""
    summary_id = f"{chart.id}-numbers"
    return (
        f"<div class='chart' id='{chart.id}' role='figure' aria-label='chart: {esc(chart.title)}' "
        f"aria-describedby='{summary_id}'></div>" + numbers(chart, runs, marks, summary_id)
    )


def numbers(chart: Chart, runs: list[RunData], marks: list[dict[str, Any]], summary_id: str) -> str:
    """The numbers behind ``chart``, folded: a row per run and signal drawn (a family's per-layer members in one
    row), then the marks in step order (at most `MAX_ROWS`, the rest counted)."""
    rows = [_row(run.name, key, *run.series[key]) for run in runs for key in chart.keys if key in run.series]
    rows += [_layers_row(run, chart) for run in runs if any(key in run.series for key in chart.layers)]
    drawn = [s for run in runs for k, (s, _) in run.series.items() if k in chart.keys + chart.layers and len(s)]
    span = f"steps {min(int(s[0]) for s in drawn)}–{max(int(s[-1]) for s in drawn)}" if drawn else "no steps"
    summary = (
        f"the numbers behind “{esc(chart.title)}”: {len(runs)} run(s), {span}, {len(marks)} mark(s) "
        "(findings, skips, rollbacks, snapshots)"
    )
    series = _table("signals", ("run", "signal", "steps", "last", "lowest", "highest", "not finite"), "".join(rows))
    return (
        f"<details class='chart-data'><summary id='{summary_id}'>{summary}</summary>{series}"
        f"{_marks_table(runs, marks)}</details>"
    )


def _layers_row(run: RunData, chart: Chart) -> str:
    """One row for a family's per-layer members: their steps, lowest, highest and non-finite count over all of
    them; "last" is the range of the members' last values (one member's last value would stand for none)."""
    members = [run.series[key] for key in chart.layers if key in run.series]
    steps = np.concatenate([s for s, _ in members])
    lasts = [_last_finite(v) for _, v in members]
    known = [x for x in lasts if x is not None]
    last = f"{_num(min(known))} … {_num(max(known))}" if known else "–"
    return _row(
        run.name,
        f"{chart.base}/* ({len(members)} members)",
        np.sort(steps),
        np.concatenate([v for _, v in members]),
        last=last,
    )


def _row(name: str, signal: str, steps: np.ndarray, values: np.ndarray, *, last: str | None = None) -> str:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    span = f"{int(steps[0])}–{int(steps[-1])}" if len(steps) else "–"
    low, high = (_num(finite.min()), _num(finite.max())) if finite.size else ("–", "–")
    if last is None:
        final = _last_finite(values)
        last = "–" if final is None else _num(final)
    return (
        f"<tr><td>{esc(name)}</td><td>{esc(signal)}</td><td>{span}</td><td>{last}</td><td>{low}</td>"
        f"<td>{high}</td><td>{int(values.size - finite.size)}</td></tr>"
    )


def _last_finite(values: np.ndarray) -> float | None:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite[-1]) if finite.size else None


def _marks_table(runs: list[RunData], marks: list[dict[str, Any]]) -> str:
    if not marks:
        return "<p class='muted'>no marks on this chart.</p>"
    ordered = sorted(marks, key=lambda m: (m["step"], m["run"]))
    # A mark's text is built escaped by keel.report.charts (plotly's hover label): its <br>s are line breaks.
    rows = "".join(
        f"<tr><td>{esc(m['step'])}</td><td>{esc(runs[m['run']].name)}</td>"
        f"<td>{esc(_mark_name(m['type']))}</td><td>{m['text'].replace('<br>', ' ')}</td></tr>"
        for m in ordered[:MAX_ROWS]
    )
    more = len(ordered) - MAX_ROWS
    return _table("marks", ("step", "run", "mark", "what"), rows) + (
        f"<p class='muted'>… and {more} more marks.</p>" if more > 0 else ""
    )


def _table(caption: str, columns: tuple[str, ...], rows: str) -> str:
    """A captioned table (its class is the caption) with a header row of ``columns``."""
    head = "".join(f"<th scope='col'>{name}</th>" for name in columns)
    return (
        f"<table class='{caption}'><caption>{caption}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _mark_name(kind: str) -> str:
    """``critical finding``, ``skipped step`` …: what a mark of this type is."""
    return MARK_NAMES.get(kind, f"{kind} finding")


def _num(x: float) -> str:
    return f"{float(x):.4g}"


__all__ = ["chart_block", "numbers"]
