"""The report's evaluation-stability table: can each eval rank the run's checkpoints (BOSE)?

One row per run and eval signal (``eval/<name>`` or ``eval/<name>/<metric>``): its checkpoints, its goal (from the
run's ``evals`` meta that `keel.guard.Guard.evaluate` writes; ``max`` assumed otherwise, and said), its
**monotonicity** over the whole run — Kendall τ-b of checkpoint order vs its values, +1 when every checkpoint
improves (`keel._core.rank_correlation.kendall_tau_b`, computed here from the stored series) — and, when the eval
gave per-example scores, its **rank τ**: the last value the Guard recorded under ``eval_stability/rank_tau/`` (the
agreement of bootstrap rankings of the recent checkpoints with the full-data ranking,
`keel.detect.eval_stability`). A rank τ below `NOISY_RANK_TAU` marks the eval too noisy to rank checkpoints; the
line's reason is given with the constant and on the page. A monotonicity a random order would give as easily
(`follows_training`) adds "not in training order" to the verdict. Read from the store only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from keel._core import keys
from keel._core.rank_correlation import NOISE_FLOOR_RANK_TAU, NOISY_RANK_TAU, kendall_tau_b
from keel.report.run_data import RunData
from keel.report.sections import esc

EXPLAINED = (
    f"Monotonicity: Kendall τ-b of checkpoint order vs the eval's values (+1: better at every checkpoint; near 0: "
    f"does not follow training). Rank τ: how steadily the eval's per-example scores rank the recent checkpoints "
    f"when the examples are resampled (bootstrap); {NOISE_FLOOR_RANK_TAU} is what checkpoints that do not differ "
    f"at all give. Below {NOISY_RANK_TAU} about one checkpoint pair in seven or more is misordered (on simulated "
    f"scores): too noisy to pick a checkpoint by. A low monotonicity with a high rank τ is a real turn (over-fitting, "
    f"forgetting, or an eval at chance that measures something else); both low, noise. 'Not in training order': "
    f"the monotonicity is within what a random order gives (one-sided 5 %). BOSE (Yang et al., ACL Findings 2025)."
)


def eval_stability_section(runs: list[RunData]) -> str:
    """The section's HTML, or "" when no run has an eval signal."""
    rows = [row for run in runs for row in eval_stability_rows(run)]
    if not rows:
        return ""
    head = (
        "<tr><th>run</th><th>eval</th><th>checkpoints</th><th>goal</th><th>monotonicity</th><th>rank τ</th>"
        "<th>verdict</th></tr>"
    )
    body = "".join(
        f"<tr><td>{esc(r['run'])}</td><td><code>{esc(r['key'])}</code></td><td>{esc(r['checkpoints'])}</td>"
        f"<td>{esc(r['goal'])}</td><td>{_num(r['monotonicity'])}</td><td>{_num(r['rank_tau'])}</td>"
        f"<td>{esc(r['verdict'])}</td></tr>"
        for r in rows
    )
    return (
        "<h2>Evaluation stability</h2>"
        f"<table class='eval-stability'>{head}{body}</table><p class='muted'>{esc(EXPLAINED)}</p>"
    )


def eval_stability_rows(run: RunData) -> list[dict[str, Any]]:
    """The table's rows for one run: run, key, checkpoints, goal, monotonicity, rank_tau, verdict."""
    evals = run.meta.get("evals")
    evals = evals if isinstance(evals, dict) else {}
    rows = []
    for key in sorted(k for k in run.series if k.startswith(keys.EVAL_PER_NAME)):
        name = key.removeprefix(keys.EVAL_PER_NAME)
        spec = evals.get(name.split("/")[0])
        goal = spec.get("goal") if isinstance(spec, dict) else None
        goal_text = goal if goal in ("max", "min") else "max (assumed)"
        _, values = run.series[key]
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        tau = kendall_tau_b(range(len(values)), values.tolist())
        monotonic = -tau if goal == "min" else tau
        rank_tau = _last(run, keys.EVAL_RANK_TAU_PER_EVAL + name)
        rows.append(
            {
                "run": run.name,
                "key": key,
                "checkpoints": run.lengths.get(key, len(values)),
                "goal": goal_text,
                "monotonicity": monotonic,
                "rank_tau": rank_tau,
                "verdict": _verdict(rank_tau, monotonic, len(values)),
            }
        )
    return rows


def _verdict(rank_tau: float, monotonic: float, checkpoints: int) -> str:
    if math.isnan(rank_tau):
        verdict = "no per-example scores: rank τ unknown"
    elif rank_tau < NOISY_RANK_TAU:
        return f"too noisy to rank checkpoints (rank τ < {NOISY_RANK_TAU})"
    else:
        verdict = "ranks checkpoints"
    return verdict if follows_training(monotonic, checkpoints) else verdict + ", not in training order"


def follows_training(monotonic: float, checkpoints: int) -> bool:
    """Whether the monotonicity is beyond what a random order of ``checkpoints`` values gives, one-sided at 5 %:
    Kendall's normal approximation z = 3τ·√(n(n−1)) / √(2(2n+5)) (no ties) above 1.645. An eval at chance whose
    checkpoints differ by noise can rank them steadily (rank τ above the line) without following training: on the
    proxy LM, multiple choice scored by option-ppl did on 2 of 3 seeds."""
    if checkpoints < 2 or math.isnan(monotonic):
        return False
    z = 3 * monotonic * math.sqrt(checkpoints * (checkpoints - 1)) / math.sqrt(2 * (2 * checkpoints + 5))
    return z > 1.645


def _last(run: RunData, key: str) -> float:
    if key not in run.series:
        return math.nan
    values = np.asarray(run.series[key][1], dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else math.nan


def _num(x: float) -> str:
    return "–" if not isinstance(x, (int, float)) or math.isnan(x) else f"{x:.2f}"


__all__ = ["EXPLAINED", "eval_stability_rows", "eval_stability_section", "follows_training"]
