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

import math
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
    losses = np.full(n, np.nan)
    losses[loss.rows] = loss.values
    has_loss = np.zeros(n, dtype=bool)
    has_loss[loss.rows] = True
    grad_bad = np.zeros(n, dtype=bool)
    grad_bad[grad.rows] = ~np.isfinite(grad.values)
    limit = NonFiniteConfig().max_overflows
    skipped: dict[int, int] = {}  # step → overflows in a row, for each non-finite gradient shown skipped
    run = 0
    for i in range(n):
        overflow = bool(grad_bad[i]) and has_loss[i] and math.isfinite(losses[i])
        run = run + 1 if overflow else 0
        after = i + 1 < n and has_loss[i + 1] and math.isfinite(losses[i + 1])
        if overflow and after and run < limit:
            skipped[int(timeline.steps[i])] = run
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
