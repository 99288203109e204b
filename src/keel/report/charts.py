"""Timeline charts: which signals get a chart, which runs' series go on it, and the marks on it.

The page draws these specs with plotly.js (`report.js`); keeping the choice here keeps it testable without a
browser. Order: loss (with validation loss), gradient norm, learning rate, then the transformer signals —
``attn/*`` and ``logits/*``, then ``act/*`` — then every other signal. A family's members
(``attn/max_logit/<layer>``, ``attn/head_entropy/<layer>/<head>``) are thin lines on the chart of the
family; ``X_max``/``X_min`` companions share ``X``'s chart. Per-parameter families (``grad/norm/<param>``
…) get no timeline: hundreds of lines nobody can read. Findings are marked on the chart of their signal (on
the loss chart when that signal has none), skips on the loss and gradient charts, rollbacks and aborts as
bands and lines on every chart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from keel._core import keys
from keel.report.run_data import RunData
from keel.report.sections import esc

MAX_CHARTS = 24
MAX_LAYERS = 16  # per-layer lines drawn per run on an attention/logits chart
LAYERED = ("attn/", "logits/", "act/")  # charted first after loss, gradient norm and LR, in this order
# Preference and RL fine-tuning (keel.signals.preference_signals / policy_signals / reward_ensemble_signals, TRL's
# statistics): charted next, and shown in a panel of their own on the page.
PREFERENCE_RL = ("pref/", "rl/", "rm/")
# Per-parameter families: hundreds of series, no timeline (the findings name the parameters that matter).
PER_PARAM = frozenset({keys.GRAD_NORM, keys.PARAM_NORM, keys.UPDATE_RATIO, keys.UPDATE_NORM})
COMPANIONS = ("_max", "_min", "_mean")
TITLES = {keys.LOSS: "loss", keys.GRAD_NORM: "gradient norm (grad/norm)", keys.LR: "learning rate (lr)"}
LOG_Y = (keys.GRAD_NORM, keys.UPDATE_NORM, keys.UPDATE_RATIO, keys.PARAM_NORM, keys.ATTN_MAX_LOGIT)


@dataclass(kw_only=True)
class Chart:
    """One timeline: its family key, title, signal keys drawn full (first = main) and members drawn thin.

    Attributes:
        id: The chart's element id.
        base: The signal (or family) the chart is for (``attn/max_logit``).
        title: Shown above the chart.
        keys: Signals drawn as full lines, one per run.
        layers: Per-layer (per-head …) members drawn as thin lines.
        log_y: A log-scale y axis (norms, which move by factors).
    """

    id: str
    base: str
    title: str
    keys: list[str]
    layers: list[str] = field(default_factory=list)
    log_y: bool = False

    @property
    def main(self) -> str:
        """The series marks sit on when their own signal is not drawn here."""
        return self.keys[0] if self.keys else self.layers[0]


def base_of(key: str) -> str | None:
    """The family a per-member key belongs to: its first two path parts (``attn/max_logit/blocks.0`` →
    ``attn/max_logit``; ``attn/head_entropy/blocks.0/h1`` → ``attn/head_entropy``); None for a scalar."""
    parts = key.split("/")
    return "/".join(parts[:2]) if len(parts) >= 3 else None


def plan_charts(runs: list[RunData]) -> tuple[list[Chart], list[str]]:
    """The charts for these runs, and the titles of those left out past `MAX_CHARTS` (for a note)."""
    all_keys = {k for run in runs for k in run.series}
    members: dict[str, list[str]] = {}
    for key in all_keys:
        base = base_of(key)
        if base is not None:
            members.setdefault(base, []).append(key)
    scalars = sorted(k for k in all_keys if base_of(k) is None)
    charts: list[Chart] = []
    used: set[str] = set()

    def add(title: str, main: list[str]) -> None:
        main = [k for k in main if k in all_keys and k not in used]
        base = title if title in members or title in all_keys else None
        layers = [] if base in PER_PARAM or base is None else sorted(members.get(base, []))[:MAX_LAYERS]
        # Companions share the chart: logits/log_z_max and logits/log_z_min with logits/log_z.
        main += [
            k
            for k in scalars
            if main and k not in used and k not in main and any(k == main[0] + suffix for suffix in COMPANIONS)
        ]
        if not main and not layers:
            return
        used.update(main)
        used.add(title)
        charts.append(
            Chart(
                id=f"chart-{len(charts)}",
                base=title,
                title=TITLES.get(title, title),
                keys=main,
                layers=layers,
                log_y=title in LOG_Y,
            )
        )

    add(keys.LOSS, [keys.LOSS, keys.VAL_LOSS])
    add(keys.GRAD_NORM, [keys.GRAD_NORM])
    add(keys.LR, [keys.LR])
    bases = sorted(set(scalars) | set(members), key=lambda k: (_priority(k), k))
    for base in bases:
        if base not in used and (base in all_keys or base not in PER_PARAM):
            add(base, [base])
    left_out = [c.title for c in charts[MAX_CHARTS:]]
    return charts[:MAX_CHARTS], left_out


def _priority(key: str) -> int:
    order = (*LAYERED, *PREFERENCE_RL)
    return next((i for i, prefix in enumerate(order) if key.startswith(prefix)), len(order))


def is_preference_rl(chart: Chart) -> bool:
    """Whether the chart shows a preference/RL signal (``pref/…``, ``rl/…``, ``rm/…``): its own panel on the page."""
    return chart.base.startswith(PREFERENCE_RL)


def chart_of(signal: str, charts: list[Chart]) -> Chart | None:
    """The chart a finding about ``signal`` is marked on: the one holding it (or its family), else loss."""
    for chart in charts:
        if signal in chart.keys or signal in chart.layers:
            return chart
    for chart in charts:
        if base_of(signal) == chart.base:
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
            y_key = f.signal if f.signal in run.series else chart.main
            out[chart.id].append(
                {
                    "run": i,
                    "type": f.severity,
                    "step": f.step,
                    "key": y_key,
                    "value": _finite(f.value),
                    "text": _finding_text(f),
                }
            )
        for d in run.decisions:
            if d.action == "skip":
                for chart in {c.id: c for c in (loss_chart, grad_chart) if c is not None}.values():
                    out[chart.id].append(
                        {
                            "run": i,
                            "type": "skip",
                            "step": d.step,
                            "key": chart.main,
                            "text": f"step {esc(d.step)} · skipped by {esc(d.by)}<br>{_wrap(d.reason)}",
                        }
                    )
            elif d.action in ("rollback", "abort"):
                for chart in charts:
                    out[chart.id].append(
                        {
                            "run": i,
                            "type": d.action,
                            "step": d.step,
                            "from": d.restored_step if d.action == "rollback" else None,
                            "text": f"step {esc(d.step)} · {esc(d.action)}<br>{_wrap(d.reason)}",
                        }
                    )
        if loss_chart is not None:
            for snap in run.snapshots:
                out[loss_chart.id].append(
                    {
                        "run": i,
                        "type": "snapshot",
                        "step": snap["step"],
                        "key": loss_chart.main,
                        "text": f"snapshot at step {esc(snap['step'])}",
                    }
                )
    return out


def _finding_text(f) -> str:
    head = f"step {esc(f.step)} · {esc(f.severity)} · {esc(f.kind)}"
    return f"{head}<br>{_wrap(f.cause)}" if f.cause else head


def _wrap(text: str, width: int = 80) -> str:
    """Escaped text broken into ``<br>``-separated lines (plotly hover labels do not wrap by themselves).

    Hover texts are plotly's pseudo-HTML (it draws ``<br>``, ``<b>``, ``<a href>`` …), so every store value in
    them goes through `esc`.
    """
    words, lines, line = esc(text).split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "<br>".join(lines + ([line] if line else []))


def _finite(x: float) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None
