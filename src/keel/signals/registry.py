"""The probe registry: built-in probes by name (the name equals the file stem)."""

from __future__ import annotations

from keel._core.registry import Registry
from keel.signals.probe import Probe

PROBES: Registry[Probe] = Registry("probe")

DEFAULT_PROBES: tuple[str, ...] = ("loss", "grad_norm", "param_norm")
FULL_PROBES: tuple[str, ...] = (*DEFAULT_PROBES, "update_ratio")


def create_probe(name: str, **kwargs: object) -> Probe:
    """Build a registered probe by name, e.g. ``create_probe("grad_norm")``."""
    return PROBES.create(name, **kwargs)


def list_probes() -> list[str]:
    return PROBES.names()
