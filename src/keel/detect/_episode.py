"""The severity ladder the threshold detectors share: a run of qualifying measurements, its onset, each severity once.

A detector whose signal leaves its healthy range opens an episode, and closes it once the signal is back (each
detector with its own hysteresis, so a value hovering at the threshold does not re-alarm). Within an episode it
counts consecutive qualifying measurements, remembers where that run began, and reports each severity at most
once: ``critical`` once, ``warning`` only as the episode's first finding. Divergence, output-logit drift,
softmax collapse, attention-logit growth, attention-entropy collapse and the edge of stability all climb it.
"""

from __future__ import annotations

from typing import Any

from keel._core.finding import Severity

KEYS = ("run", "onset", "reported")
REPORTABLE = (None, "warning", "critical")


class Episode:
    """One detector's current episode.

    Attributes:
        run: Consecutive qualifying measurements (a detector's ``patience`` counts them).
        onset: Step at which the current run (or episode) began; -1 for none.
        reported: The highest severity reported in this episode; None before its first finding.
        keys: The attributes the detector's state stores (its ``state_dict`` keys), the ones it uses.

    Example:
        >>> ep, found = Episode(), []
        >>> for step, x in enumerate([3.0, 4.0, 9.0, 9.0]):  # every measurement qualifies; patience 2, critical 8
        ...     _ = ep.qualify(onset=step)
        ...     found.append(ep.escalate(critical=x >= 8, warning=ep.run >= 2))
        >>> found, ep.onset
        ([None, 'warning', 'critical', None], 0)
    """

    def __init__(self, keys: tuple[str, ...] = KEYS) -> None:
        if not set(keys) <= set(KEYS):
            raise ValueError(f"Episode keys={keys!r}; allowed: a subset of {KEYS!r}")
        self.keys = keys
        self.run = 0
        self.onset = -1
        self.reported: Severity | None = None

    def qualify(self, onset: int) -> bool:
        """Count one more qualifying measurement; a new run begins at ``onset``. True when it did."""
        started = self.run == 0
        if started:
            self.onset = onset
        self.run += 1
        return started

    def open(self, step: int) -> None:
        """Date the episode at ``step`` unless it is dated already (a detector without a run to count)."""
        if self.onset < 0:
            self.onset = step

    def break_run(self) -> None:
        """A measurement that does not qualify: the run starts over, the onset stays until the next run begins."""
        self.run = 0

    def calm(self) -> None:
        """Back under the threshold but not yet out of the episode: the run and onset end, ``reported`` stays."""
        self.run, self.onset = 0, -1

    def close(self) -> None:
        """The signal is healthy again: a later excursion is a new episode that may report every severity."""
        self.run, self.onset, self.reported = 0, -1, None

    def escalate(self, *, critical: bool, warning: bool) -> Severity | None:
        """The severity to report now, if any, given whether the measurement is critical and warning-worthy.

        ``critical`` unless this episode reported it already; else ``warning`` if nothing was reported yet.
        """
        severity: Severity | None = None
        if critical and self.reported != "critical":
            severity = "critical"
        elif warning and self.reported is None:
            severity = "warning"
        if severity is not None:
            self.reported = severity
        return severity

    def onset_or(self, step: int) -> int:
        """The onset, or ``step`` when no run is dated."""
        return self.onset if self.onset >= 0 else step

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Read this episode's keys from a detector's state; one it lacks (saved before it was stored) starts fresh."""
        reported = state.get("reported") if "reported" in self.keys else None
        if reported not in REPORTABLE:
            raise ValueError(f"Episode state reported={reported!r}; allowed: None, 'warning', 'critical'")
        self.run = int(state.get("run", 0)) if "run" in self.keys else 0
        self.onset = int(state.get("onset", -1)) if "onset" in self.keys else -1
        self.reported = reported
