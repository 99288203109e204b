"""Timeline charts: which signals get a chart, which runs' series go on it, and the marks on it.

The page draws these specs with plotly.js (`report.js`); keeping the choice here keeps it testable without a
browser. Order: loss (with validation loss), gradient norm, learning rate, then the transformer signals —
``attn/*`` with a thin line per layer, ``logits/*`` — then every other scalar signal. Per-parameter families
(``grad/norm/<param>`` …) get no timeline: hundreds of lines nobody can read. Findings are marked on the
chart of their signal (on the loss chart when that signal has none), skips on the loss and gradient charts,
rollbacks and aborts as bands and lines on every chart.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from keel._core import keys
from keel.report.run_data import RunData

MAX_CHARTS = 24
MAX_LAYERS = 16  # per-layer lines drawn per run on an attention/logits chart
LAYERED = ("attn/", "logits/")  # families whose per-layer members are drawn
LOG_Y = (keys.GRAD_NORM, keys.UPDATE_NORM, keys.UPDATE_RATIO, keys.PARAM_NORM, "attn/max_logit")
VAL_LOSS = "val/loss"


@dataclass(kw_only=True)
class Chart:
    """One timeline: a title, its signal keys (first = main) and members drawn thin (per-layer)."""

    id: str
    title: str
    keys: list[str]
    layers: list[str] = field(default_factory=list)
    log_y: bool = False


def families(all_keys: set[str]) -> set[str]:
    """Keys ``X`` that have per-member keys ``X/<name>`` (except ``lr``, whose ``lr/<group>`` are scalars)."""
    found = set()
    for key in all_keys:
        head, sep, _ = key.rpartition("/")
        if sep and head in all_keys and head != keys.LR:
            found.add(head)
    return found


def plan_charts(runs: list[RunData]) -> tuple[list[Chart], list[str]]:
    """The charts for these runs, and the signals left without one (for a note on the page)."""
    all_keys = {k for run in runs for k in run.series}
    fams = families(all_keys)
    members = {k for k in all_keys if any(k.startswith(f + "/") for f in fams)}
    scalars = sorted(all_keys - members)
    charts: list[Chart] = []
    used: set[str] = set()

    def add(title: str, chart_keys: list[str], layers: list[str] | None = None) -> None:
        chart_keys = [k for k in chart_keys if k in all_keys and k not in used]
        if not chart_keys:
            return
        used.update(chart_keys)
        charts.append(Chart(id=f"chart-{len(charts)}", title=title, keys=chart_keys, layers=layers or [],
                            log_y=chart_keys[0] in LOG_Y))

    add("loss", [keys.LOSS, VAL_LOSS])
    add("gradient norm", [keys.GRAD_NORM])
    add("learning rate", [keys.LR] + [k for k in scalars if k.startswith(keys.LR + "/")])
    for prefix in LAYERED:
        for key in [k for k in scalars if k.startswith(prefix)]:
            layers = sorted(k for k in members if k.startswith(key + "/"))[:MAX_LAYERS] if key in fams else []
            add(key, [key], layers)
    for key in scalars:
        add(key, [key])
    left_out = [c.title for c in charts[MAX_CHARTS:]]
    return charts[:MAX_CHARTS], left_out


def chart_of(signal: str, charts: list[Chart]) -> Chart | None:
    """The chart a finding about ``signal`` is marked on: the one holding it (or its family), else loss."""
    for chart in charts:
        if signal in chart.keys or signal in chart.layers:
            return chart
    for chart in charts:
        if any(signal.startswith(k + "/") for k in chart.keys):
            return chart
    return next((c for c in charts if keys.LOSS in c.keys), charts[0] if charts else None)


def marks(runs: list[RunData], charts: list[Chart]) -> dict[str, list[dict[str, Any]]]:
    """Chart id → marks: findings (by severity), skips, snapshots, rollbacks and aborts, per run."""
    out: dict[str, list[dict[str, Any]]] = {c.id: [] for c in charts}
    if not charts:
        return out
    loss_chart = chart_of(keys.LOSS, charts)
    grad_chart = next((c for c in charts if keys.GRAD_NORM in c.keys), None)
    for i, run in enumerate(runs):
        for f in run.findings:
            chart = chart_of(f.signal, charts)
            if chart is None:
                continue
            y_key = f.signal if f.signal in run.series else chart.keys[0]
            out[chart.id].append({"run": i, "type": f.severity, "step": f.step, "key": y_key,
                                  "value": _finite(f.value), "text": _finding_text(f)})
        for d in run.decisions:
            if d.action == "skip":
                for chart in {c.id: c for c in (loss_chart, grad_chart) if c is not None}.values():
                    out[chart.id].append({"run": i, "type": "skip", "step": d.step, "key": chart.keys[0],
                                          "text": f"step {d.step} · skipped by {d.by}<br>{_wrap(d.reason)}"})
            elif d.action in ("rollback", "abort"):
                for chart in charts:
                    out[chart.id].append({"run": i, "type": d.action, "step": d.step,
                                          "from": d.restored_step if d.action == "rollback" else None,
                                          "text": f"step {d.step} · {d.action}<br>{_wrap(d.reason)}"})
        if loss_chart is not None:
            for snap in run.snapshots:
                out[loss_chart.id].append({"run": i, "type": "snapshot", "step": snap["step"],
                                           "key": loss_chart.keys[0],
                                           "text": f"snapshot at step {snap['step']}"})
    return out


def _finding_text(f) -> str:
    head = f"step {f.step} · {f.severity} · {f.kind}"
    return f"{head}<br>{_wrap(f.cause)}" if f.cause else head


def _wrap(text: str, width: int = 80) -> str:
    """Escaped text broken into ``<br>``-separated lines (plotly hover labels do not wrap by themselves)."""
    words, lines, line = html.escape(text).split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "<br>".join(lines + ([line] if line else []))


def _finite(x: float) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None
