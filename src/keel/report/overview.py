"""What the report shows first, and the diagnosis cards shown once for the runs that share them.

The first screen answers "what happened?": the runs side by side (a compact table), the named cause of each,
and the loss chart with its marks (findings, skips, rollbacks). Runs compared in one report often share much
of their history — the same seed up to where a guard acted — so a cause or a card that several runs have in
common is shown once, with the names of the runs that share it.
"""

from __future__ import annotations

from collections import Counter

from keel._core.finding import Finding, severity_rank
from keel.report.run_data import RunData
from keel.report.sections import diagnosis_cards, esc, problems, runs_table

MARKS_LEGEND = (
    "Drag to zoom (all charts follow), double-click to reset; from the keyboard, Tab to a chart's toolbar and "
    "press Enter on zoom in, zoom out or reset. Each chart's numbers and marks are in the table folded under it. "
    "Lines show each bucket's minimum and "
    "maximum, so one-step spikes stay visible at any zoom. Marks: grey ○ info, orange ▲ warning, red × "
    "critical, | skipped step, dashed line and band: rollback (band = the steps undone), ▽ snapshot."
)

# A heading, not a bold paragraph: a screen reader's list of headings goes from the title to the named cause.
NAMED_HEADING = "<h2 class='named'>named cause</h2>"


def overview(runs: list[RunData], colors: list[str], loss_chart: str | None) -> str:
    """The first screen: the runs table beside the named causes, what could not be read, then the loss chart
    (its element and numbers, `keel.report.chart_text.chart_block`) and what its marks mean."""
    unreadable = "".join(problems([f"{run.name}: {p}" for p in run.problems]) for run in runs)
    chart = (
        f"{loss_chart}<p class='muted'>{esc(MARKS_LEGEND)}</p>"
        if loss_chart is not None
        else "<p class='muted'>these runs have no signals yet.</p>"
    )
    return (
        f"<section id='overview'><div class='top'>{runs_table(runs, colors)}{named_causes(runs, colors)}</div>"
        f"{unreadable}{chart}</section>"
    )


def named_causes(runs: list[RunData], colors: list[str]) -> str:
    """Each run's named causes (the Guard's ``diagnosis``, most likely first), a cause several runs share listed
    once with their names. A run without a recorded diagnosis (it did not close: the Guard names the causes at
    ``close()``) lists its worst findings instead, and says so."""
    shared: dict[tuple[str, str], list[int]] = {}
    missing: dict[str, list[int]] = {}  # why a run has no recorded diagnosis → those runs
    for i, run in enumerate(runs):
        recorded = run.meta.get("diagnosis")
        entries = (
            [(str(d.get("title", d.get("kind", "?"))), str(d.get("when", ""))) for d in recorded if isinstance(d, dict)]
            if isinstance(recorded, list)
            else []
        )
        if not isinstance(recorded, list):
            entries = _worst_findings(run.findings)
            if entries:
                closed = run.meta.get("status", "running") != "running"
                missing.setdefault("the store has none" if closed else "the run did not close", []).append(i)
        for entry in entries:
            shared.setdefault(entry, []).append(i)
    if not shared:
        return f"<div class='card named'>{NAMED_HEADING}<p>none: no warnings or criticals.</p></div>"
    several = len(runs) > 1
    items = "".join(
        f"<li><b>{esc(title)}</b> — {esc(when)}"
        + (f" <span class='who'>· {_who(who, runs, colors)}</span>" if several else "")
        + "</li>"
        for (title, when), who in shared.items()
    )
    notes = "".join(
        f"<p class='muted'>{_who(who, runs, colors)}: no named cause recorded ({why}); "
        f"{'their' if len(who) > 1 else 'its'} worst findings are listed</p>"
        for why, who in missing.items()
    )
    return f"<div class='card named'>{NAMED_HEADING}<ol class='causes'>{items}</ol>{notes}</div>"


def shared_cards(runs: list[RunData], colors: list[str]) -> str:
    """The diagnosis cards (`keel.report.sections.diagnosis_cards`) grouped by the runs that have them: a card
    identical in several runs is shown once, under the names of the runs that share it."""
    holders: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        for card in dict.fromkeys(diagnosis_cards(run)):
            holders.setdefault(card, []).append(i)
    groups: dict[tuple[int, ...], list[str]] = {}
    for card, who in holders.items():  # in order of first appearance
        groups.setdefault(tuple(who), []).append(card)
    return (
        "<div class='diag'>"
        + "".join(
            f"<section class='group'><h3>{'shared by ' if len(who) > 1 else ''}{_who(list(who), runs, colors)}</h3>"
            f"{''.join(cards)}</section>"
            for who, cards in groups.items()
        )
        + "</div>"
    )


def _who(indices: list[int], runs: list[RunData], colors: list[str]) -> str:
    return ", ".join(f"<span class='swatch' style='background:{colors[i]}'></span>{esc(runs[i].name)}" for i in indices)


def _worst_findings(findings: list[Finding], limit: int = 3) -> list[tuple[str, str]]:
    """(title, when) of the worst kinds of warning/critical finding, most severe and earliest first."""
    serious = [f for f in findings if severity_rank(f.severity) >= 1]  # as the cards count them
    first: dict[str, Finding] = {}
    worst: dict[str, Finding] = {}
    for f in serious:
        first.setdefault(f.kind, f)
        if severity_rank(f.severity) > severity_rank(worst.setdefault(f.kind, f).severity):
            worst[f.kind] = f
    counts = Counter(f.kind for f in serious)
    kinds = sorted(first, key=lambda k: (-severity_rank(worst[k].severity), first[k].step))[:limit]
    return [
        (f"{worst[k].severity} {k.replace('_', ' ')}", f"first at step {first[k].step}, {counts[k]}×") for k in kinds
    ]


__all__ = ["named_causes", "overview", "shared_cards"]
