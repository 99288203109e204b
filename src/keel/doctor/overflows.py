"""Non-finite gradients a log shows were skipped: mixed-precision loss-scaler overflows, not poisoned updates.

Live, `keel.detect.NonFiniteDetector` tells a ``torch.amp.GradScaler``'s overflow (it skips that step itself and
halves its scale) from a NaN update by the loss scale it is handed: the overflow is ``info``. A Trainer's log
(``trainer_state.json``, TRL's included) records no loss scale, so every fp16 overflow — the first steps of a run
while the scale calibrates, an odd batch later — reads as a critical NaN there. The log shows the difference all
the same: an update applied with non-finite gradients leaves NaN weights, and every loss after it is NaN; a
skipped one leaves the next loss finite (and the learning rate where it was). So, offline, a non-finite
gradient norm whose loss is finite, followed by a finite loss, is the scaler's skipped overflow, unless the
detector's ``max_overflows`` of them came in a row (the endless-skip loop it calls critical live too). One with
no loss logged after it has nothing to show it was skipped and stays critical.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from keel._core import keys
from keel._core.finding import Finding
from keel.detect.non_finite import NonFiniteConfig
from keel.doctor.timeline import Timeline


def skipped_overflows(findings: list[Finding], timeline: Timeline) -> list[Finding]:
    """``findings`` with each critical non-finite gradient the log shows was skipped turned into the ``info``
    ``loss_scale_overflow`` the live detector reports for it."""
    loss = timeline.signals.get(keys.LOSS)
    grad = timeline.signals.get(keys.GRAD_NORM)
    if loss is None or grad is None:
        return findings
    n = len(timeline)
    finite_loss = np.zeros(n, dtype=bool)
    finite_loss[loss.rows] = np.isfinite(loss.values)
    grad_bad = np.zeros(n, dtype=bool)
    grad_bad[grad.rows] = ~np.isfinite(grad.values)
    at = np.flatnonzero(grad_bad & finite_loss)  # the overflows: few, so what follows is per overflow, not per step
    # overflows in a row up to each: its distance from the first of its run of consecutive observations
    starts_run = np.r_[True, np.diff(at) != 1] if len(at) else np.zeros(0, dtype=bool)
    run = at - np.maximum.accumulate(np.where(starts_run, at, 0)) + 1
    after = np.zeros(len(at), dtype=bool)  # the next observation's loss is finite
    inside = at + 1 < n
    after[inside] = finite_loss[at[inside] + 1]
    shown = (after & (run < NonFiniteConfig().max_overflows)).nonzero()[0]
    # step → overflows in a row, for each non-finite gradient shown skipped (a restarted step: its last)
    skipped = dict(zip(timeline.steps[at[shown]].tolist(), run[shown].tolist(), strict=True))
    return [_as_overflow(f, skipped[f.step]) if _is_grad_nan(f) and f.step in skipped else f for f in findings]


def _is_grad_nan(finding: Finding) -> bool:
    return finding.kind == "non_finite" and finding.evidence.get("non_finite") == [keys.GRAD_NORM]


def _as_overflow(finding: Finding, consecutive: int) -> Finding:
    return replace(
        finding,
        kind="loss_scale_overflow",
        severity="info",
        evidence={**finding.evidence, "consecutive": consecutive, "skipped": "the next logged loss is finite"},
        cause="Non-finite gradients with a finite loss, and the loss after it finite too: the update was skipped "
        "(a mixed-precision loss scaler's overflow; the log records no loss scale).",
        advice="Nothing: mixed-precision loss scaling handles occasional overflows (Micikevicius et al. 2018).",
    )
