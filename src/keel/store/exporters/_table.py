"""RunTable: a run store read once into what every exporter writes — signals by step, findings, decisions, meta."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel._core.decision import Decision
from keel._core.finding import Finding
from keel.store.reader import RunReader


@dataclass
class RunTable:
    """One run's contents, in step order.

    Attributes:
        name: The run's name (its directory's name).
        keys: Signal keys, sorted.
        rows: ``(step, {key: value})`` per step that logged anything, in step order; NaN stays NaN. A key
            logged twice at one step (a resumed run re-logs the steps after its snapshot) keeps the later value.
        findings: Every finding.
        decisions: Every decision that was not a plain ``"ok"``.
        meta: The run's metadata (config, seed, versions, status …).
    """

    name: str
    keys: list[str]
    rows: list[tuple[int, dict[str, float]]]
    findings: list[Finding] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, run: str | Path, keys: list[str] | None = None) -> RunTable:
        """Read a run store; ``keys`` are glob patterns (``grad/norm*``) selecting signals, default all.

        Raises:
            FileNotFoundError: No store at ``run``.
        """
        with RunReader(run) as reader:
            names = [k for k in reader.signal_keys() if keys is None or any(fnmatch.fnmatchcase(k, p) for p in keys)]
            by_step: dict[int, dict[str, float]] = {}
            for key in names:
                steps, values = reader.signal(key)
                for step, value in zip(steps.tolist(), values.tolist(), strict=True):
                    by_step.setdefault(step, {})[key] = value
            path = reader.path
            return cls(
                name=path.parent.name,
                keys=names,
                rows=sorted(by_step.items()),
                findings=reader.findings(),
                decisions=reader.decisions(),
                meta=reader.meta(),
            )

    def finding_records(self) -> list[dict[str, Any]]:
        """Findings as JSON-able dicts (NaN values as None)."""
        return [{k: _plain(v) for k, v in f.to_dict().items()} for f in self.findings]

    def decision_records(self) -> list[dict[str, Any]]:
        """Decisions as JSON-able dicts."""
        return [
            {
                "step": d.step,
                "action": d.action,
                "reason": d.reason,
                "by": d.by,
                "onset": d.onset,
                "restored_step": d.restored_step,
            }
            for d in self.decisions
        ]


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
