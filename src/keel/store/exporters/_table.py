"""RunTable: what every exporter writes — signals by step (read from the store as they are written out), findings,
decisions, meta."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel._core.decision import Decision
from keel._core.errors import KeelWarning
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
            Read from the store each time it is iterated, a step at a time (`StepRows`): a run of a million
            steps is never held whole.
        findings: Every finding.
        decisions: Every decision that was not a plain ``"ok"``.
        meta: The run's metadata (config, seed, versions, status …).
    """

    name: str
    keys: list[str]
    rows: StepRows
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
            path = reader.path
            return cls(
                name=path.parent.name,
                keys=names,
                rows=StepRows(path, names, reader.step_span(names)),
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


@dataclass(frozen=True)
class StepRows:
    """A run's signals by step, read from its store each time they are iterated (`RunReader.signal_rows`).

    Attributes:
        path: The store file.
        keys: The signals read.
        span: The first and the last step logged (None when nothing was), for a progress bar.
        on_step: Called with a step every `PROGRESS_EVERY` steps read and with the last one (a progress bar's
            callback), or None.
    """

    path: Path
    keys: list[str]
    span: tuple[int, int] | None
    on_step: Callable[[int], None] | None = None

    def __iter__(self) -> Iterator[tuple[int, dict[str, float]]]:
        with warnings.catch_warnings():  # a store a newer keel wrote was warned about when it was read
            warnings.simplefilter("ignore", KeelWarning)
            reader = RunReader(self.path)
        with reader:
            if self.on_step is None:
                yield from reader.signal_rows(self.keys)
                return
            step = None
            for i, (step, values) in enumerate(reader.signal_rows(self.keys)):
                if i % PROGRESS_EVERY == 0:
                    self.on_step(step)
                yield step, values
            if step is not None:
                self.on_step(step)


PROGRESS_EVERY = 1000  # steps between two calls of `StepRows.on_step`


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
