"""Non-finite-origin detector: names the first block whose output held NaN or Inf.

Reads the per-block ``act/max_abs/`` family of the `activation_rms` probe, in forward order. NaN and Inf
propagate forward, so every block after the one where they were born is non-finite too; the first one is
the origin. metaseq's ``NanDetector`` finds the same by re-running the failed step with hooks on every
module (reference/anchors.md §2.3); here it costs nothing extra, at block resolution (name finer modules in
the probe's ``modules`` for more). Reported once per episode; the episode ends at the next finite step.

References:
    metaseq ``metaseq/nan_detector.py``; HF ``transformers/debug_utils.py`` (``DebugUnderflowOverflow``).
"""

from __future__ import annotations

import math
from typing import Any

from keel._core.finding import Finding
from keel._core.observation import Observation
from keel.detect.causes import cause_for
from keel.detect.detector import DETECTORS

FAMILY = "act/max_abs/"


@DETECTORS.register("non_finite_origin")
class NonFiniteOriginDetector:
    """Flags the first module in forward order whose output is not finite.

    Example:
        >>> from keel._core import Observation
        >>> obs = Observation(step=7, per_param={"act/max_abs/": (("blocks.0", "blocks.1", "blocks.2"),
        ...                                                        [3.0, float("inf"), float("nan")])})
        >>> [(f.step, f.evidence["module"]) for f in NonFiniteOriginDetector().update(obs)]
        [(7, 'blocks.1')]
    """

    name = "non_finite_origin"

    def __init__(self) -> None:
        self._active = False

    def update(self, obs: Observation) -> list[Finding]:
        names, values = obs.per_param.get(FAMILY, ((), []))
        bad = [name for name, value in zip(names, values) if not math.isfinite(value)]
        if not bad:
            if names:
                self._active = False
            return []
        if self._active:
            return []
        self._active = True
        origin = bad[0]
        finite_before = [n for n in names[: names.index(origin)]]
        cause = cause_for("non_finite")
        evidence: dict[str, Any] = {"module": origin, "non_finite": bad, "finite_before": finite_before}
        if cause is not None:
            evidence["remedies"] = cause.remedy_dicts()
        return [Finding(step=obs.step, kind="non_finite_origin", severity="critical", signal=FAMILY + origin,
                        value=values[names.index(origin)], evidence=evidence,
                        cause=f"NaN/Inf was born in {origin}: its output is the first non-finite one in forward "
                              f"order ({len(finite_before)} module(s) before it were finite).",
                        remedy=f"Look inside {origin} for an overflow (exp, x², division, log of 0) in the working "
                               "precision; " + (cause.remedy_text() if cause else ""))]

    def state_dict(self) -> dict[str, Any]:
        return {"active": self._active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._active = bool(state["active"])
