"""The detector contract and registry: observations in, findings out, state that survives a restore."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.registry import Registry


@runtime_checkable
class Detector(Protocol):
    """Reads one `Observation` per step and returns the findings it supports.

    Detectors only decide what they see; they never act. Their state round-trips through
    ``state_dict``/``load_state_dict`` so a rollback restores the baselines of the restored step.
    """

    name: str

    def update(self, obs: Observation) -> list[Finding]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


DETECTORS: Registry[Detector] = Registry("detector")


def create_detector(name: str, **kwargs: object) -> Detector:
    """Build a registered detector by name, e.g. ``create_detector("spike", signal="grad/norm")``."""
    return DETECTORS.create(name, **kwargs)


def list_detectors() -> list[str]:
    return DETECTORS.names()
