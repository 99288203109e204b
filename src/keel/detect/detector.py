"""The detector contract and registry: observations in, findings out, state that survives a restore."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from keel._core import keys
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


def restarts_at_switch(detector: Detector) -> bool:
    """Whether a phase switch (a new task, a new data mix) starts ``detector`` afresh: a one-signal detector of the
    loss or the gradient norm (spikes, divergence), whose baseline is the old phase's level. The live Guard
    (`keel.guard.evaluation`) and `keel doctor` on a store's declared phases both follow this rule."""
    return getattr(getattr(detector, "config", None), "signal", None) in (keys.LOSS, keys.GRAD_NORM)
