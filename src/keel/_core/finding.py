"""Finding: what a detector saw at one step, with its evidence, likely cause and advice."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One detector observation, the unit every layer above `detect/` speaks in.

    Attributes:
        step: Optimizer step the finding belongs to (0-based, counted by `Guard`).
        kind: What was seen, e.g. ``"loss_spike"``, ``"divergence"``, ``"non_finite"``.
        severity: ``"info"`` (worth knowing, no action), ``"warning"`` (a person should look),
            ``"critical"`` (a policy may act: skip, roll back, abort).
        signal: The signal key the finding is about (``"loss"``, ``"grad/norm"``, ...).
        value: The signal's value at ``step`` (NaN when not applicable).
        baseline: What the detector expected (NaN when it had no baseline).
        evidence: Detector-specific facts (z-score, onset step, offending parameters, ...). JSON-able.
        cause: The likely cause, in one or two sentences.
        advice: What to do about it, citing the paper or practice it comes from.
    """

    step: int
    kind: str
    severity: Severity
    signal: str
    value: float = math.nan
    baseline: float = math.nan
    evidence: dict[str, Any] = field(default_factory=dict)
    cause: str = ""
    advice: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding.severity={self.severity!r}; allowed: {', '.join(SEVERITIES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def severity_rank(severity: str) -> int:
    """0 for info, 1 for warning, 2 for critical; raises ValueError for anything else."""
    try:
        return SEVERITIES.index(severity)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"severity={severity!r}; allowed: {', '.join(SEVERITIES)}") from None
