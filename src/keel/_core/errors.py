"""Errors and warnings keel raises."""

from __future__ import annotations


class KeelError(Exception):
    """Base class for keel's own exceptions."""


class TrainingAborted(KeelError):
    """Raised by `Guard.step` when the escalation ladder ends in ``abort``.

    The run store is flushed before it is raised; ``decision`` holds the recorded decision.
    """

    def __init__(self, message: str, decision: object | None = None) -> None:
        super().__init__(message)
        self.decision = decision


class GuardClosed(KeelError, RuntimeError):
    """Raised by `Guard.step` after `Guard.close`: the run store is closed, so the step is not taken at all."""


class KeelWarning(UserWarning):
    """A keel component degraded (a probe failed, the store could not write) but training goes on."""
