"""The page's HTML sections other than the charts: runs table, diagnosis cards, decisions, snapshots, notes.

Tables put their header row in <thead>: printed, a 200-row decisions table repeats it on every page.

`keel.report.overview` puts the runs table and the named causes on the first screen and groups the cards.

Every value that comes from a store goes through `esc`, numbers too: a store is untrusted input (a run's config
or a finding's cause is data, not markup, and a crafted store can hold text where keel writes integers).
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from typing import Any

import numpy as np

from keel._core import keys
from keel._core.finding import Finding, severity_rank
from keel.report.run_data import RunData

MAX_ROWS = 200  # decisions and snapshots listed per run; the rest are counted
META_FIELDS = ("status", "policy", "steps", "seed", "model", "optimizer", "started_at", "finished_at", "git_sha")


def esc(value: Any) -> str:
    """``value`` as HTML text (quotes escaped too, so it is safe inside an attribute)."""
    return html.escape(str(value), quote=True)


def runs_table(runs: list[RunData], colors: list[str]) -> str:
    """One compact row per run: its label (the folder in a tooltip), status, outcome (last and best loss), counts
    of findings and actions. The seed and the rest are in the run's metadata further down."""
    head = (
        "<tr><th>run</th><th>status</th><th>policy</th><th>steps</th><th>loss (last 20)</th>"
        "<th>best loss</th><th>critical / warning / info</th><th>skips</th><th>rollbacks</th></tr>"
    )
    rows = []
    for run, color in zip(runs, colors, strict=True):
        counts = Counter(f.severity for f in run.findings)
        actions = Counter(d.action for d in run.decisions)
        last, best = _loss_summary(run)
        rows.append(
            f"<tr><td title='{esc(run.path)}'><span class='swatch' style='background:{color}'></span>"
            f"{esc(run.name)}</td>"
            f"<td>{esc(run.meta.get('status', '?'))}</td><td>{esc(run.meta.get('policy', '?'))}</td>"
            f"<td>{esc(run.meta.get('steps', run.lengths.get(keys.LOSS, '?')))}</td>"
            f"<td>{esc(last)}</td><td>{esc(best)}</td>"
            f"<td>{counts['critical']} / {counts['warning']} / {counts['info']}</td>"
            f"<td>{actions['skip']}</td><td>{actions['rollback']}</td></tr>"
        )
    return f"<table class='runs'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def metadata(run: RunData) -> str:
    """The run's folder, and its metadata folded into <details>."""
    return f"<p class='path'>{esc(run.name)}: {esc(run.path)}</p>" + meta_details(run.name, run.meta)


def meta_details(name: str, meta: dict[str, Any]) -> str:
    """A store's metadata as a definition list folded into <details> (`META_FIELDS` first, each value cut at
    300 characters)."""
    order = [k for k in META_FIELDS if k in meta] + sorted(set(meta) - set(META_FIELDS))
    items = "".join(f"<dt>{esc(key)}</dt><dd>{_short(meta[key])}</dd>" for key in order)
    return f"<details class='meta'><summary>metadata of {esc(name)}</summary><dl>{items}</dl></details>"


def problems(lines: list[str]) -> str:
    """What could not be read from a store, one paragraph each."""
    return "".join(f"<p class='problem'>{esc(p)}</p>" for p in lines)


def diagnosis_cards(run: RunData) -> list[str]:
    """A card per kind of warning/critical finding (first step, count, evidence, cause, advice), an ``ok``
    card when there is none, and a line counting the info findings. Nothing in a card names its run: the same
    card of several runs is the same text (`keel.report.overview.shared_cards` shows it once)."""
    serious = [f for f in run.findings if severity_rank(f.severity) >= 1]
    infos = [f for f in run.findings if f.severity == "info"]
    cards = []
    by_kind: dict[str, list[Finding]] = {}
    for f in serious:
        by_kind.setdefault(f.kind, []).append(f)
    for kind, group in sorted(
        by_kind.items(), key=lambda kv: (-max(severity_rank(f.severity) for f in kv[1]), kv[1][0].step)
    ):
        worst = max(group, key=lambda f: severity_rank(f.severity))
        first = group[0]
        steps = ", ".join(esc(f.step) for f in group[:12]) + (" …" if len(group) > 12 else "")
        evidence = "".join(
            f"<tr><th>{esc(k)}</th><td>{_short(v)}</td></tr>"
            for k, v in first.evidence.items()
            if k not in ("advice", "traceback")
        )
        ranked = first.evidence.get("advice")
        advice_html = f"<p><b>advice</b> {esc(first.advice)}</p>" if first.advice else ""
        if isinstance(ranked, list) and ranked:  # the ranked list says it all, with its sources
            advice_html = (
                "<p><b>advice</b></p><ol class='advice'>"
                + "".join(_advice_item(a) for a in ranked if isinstance(a, dict))
                + "</ol>"
            )
        cards.append(
            f"<div class='card {esc(worst.severity)}'><div class='card-head'>"
            f"<span class='badge {esc(worst.severity)}'>{esc(worst.severity)}</span> "
            f"<b>{esc(kind.replace('_', ' '))}</b> on <code>{esc(first.signal)}</code> — "
            f"first at step {esc(first.step)}, {len(group)}× (steps {steps})</div>"
            f"<p><b>cause</b> {esc(first.cause)}</p>{advice_html}"
            f"<p class='values'>value {_num(first.value)} · baseline {_num(first.baseline)}</p>"
            f"<table class='evidence'>{evidence}</table></div>"
        )
    if not cards:
        cards.append("<div class='card ok'><span class='badge ok'>ok</span> no warnings or criticals.</div>")
    if infos:
        kinds = Counter(f.kind for f in infos)
        listed = ", ".join(f"{n}× {esc(k.replace('_', ' '))}" for k, n in kinds.most_common())
        cards.append(
            f"<p class='infos'>info findings (no alarm, e.g. one-batch outliers): {listed}; "
            "grey circles on the charts.</p>"
        )
    return cards


def decisions_table(run: RunData) -> str:
    if not run.decisions:
        return "<p class='muted'>no step was skipped or rolled back.</p>"
    counts = Counter(d.action for d in run.decisions)
    head = "<tr><th>step</th><th>action</th><th>by</th><th>onset</th><th>restored step</th><th>reason</th></tr>"
    rows = "".join(
        f"<tr><td>{esc(d.step)}</td><td>{esc(d.action)}</td><td>{esc(d.by)}</td><td>{_opt(d.onset)}</td>"
        f"<td>{_opt(d.restored_step)}</td><td>{esc(d.reason)}</td></tr>"
        for d in run.decisions[:MAX_ROWS]
    )
    extra = len(run.decisions) - MAX_ROWS
    more = f"<p class='muted'>… and {extra} more.</p>" if extra > 0 else ""
    summary = ", ".join(f"{n} {esc(a)}" for a, n in counts.items())
    return (
        f"<details><summary>{summary}</summary><table class='decisions'><thead>{head}</thead><tbody>{rows}</tbody>"
        f"</table>{more}</details>"
    )


def snapshots_table(run: RunData) -> str:
    if not run.snapshots:
        return "<p class='muted'>no disk snapshots recorded.</p>"
    head = "<tr><th>step</th><th>path</th><th>checksum</th></tr>"
    rows = "".join(
        f"<tr><td>{esc(s['step'])}</td><td><code>{esc(s['path'])}</code></td>"
        f"<td><code>{esc(str(s['checksum'])[:16])}</code></td></tr>"
        for s in run.snapshots[:MAX_ROWS]
    )
    return (
        f"<details><summary>{len(run.snapshots)} snapshot(s)</summary><table><thead>{head}</thead>"
        f"<tbody>{rows}</tbody></table></details>"
    )


def _advice_item(advice: dict[str, Any]) -> str:
    how = f" <span class='how'>{esc(advice['how'])}</span>" if advice.get("how") else ""
    source = f" <span class='src'>({esc(advice['source'])})</span>" if advice.get("source") else ""
    return f"<li>{esc(advice.get('action', ''))}{how}{source}</li>"


def _loss_summary(run: RunData) -> tuple[str, str]:
    if keys.LOSS not in run.series:
        return "–", "–"
    values = run.series[keys.LOSS][1]
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return "non-finite", "–"
    return f"{float(np.median(finite[-20:])):.4g}", f"{float(finite.min()):.4g}"


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return esc(text if len(text) <= limit else text[:limit] + " …")


def _num(x: float) -> str:
    return "–" if not isinstance(x, (int, float)) or math.isnan(x) else f"{x:.4g}"


def _opt(x: int | None) -> str:
    return "" if x is None else esc(x)


__all__ = [
    "decisions_table",
    "diagnosis_cards",
    "meta_details",
    "metadata",
    "problems",
    "runs_table",
    "snapshots_table",
]
