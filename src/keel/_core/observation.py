"""Observation: the host-side values of one step, as detectors read them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class Observation:
    """All signal values of one step, after the single device→host copy.

    Detectors read observations; they come from `Guard` during training or from a log file in
    `keel doctor`, so nothing here depends on torch.

    Attributes:
        step: The step the values belong to.
        values: Scalar signals by key (``"loss"``, ``"grad/norm"``, ``"lr"`` ...).
        per_param: Per-parameter families by family key (``"grad/norm/"``) as (names, values), kept
            unexpanded because most steps never need the names.
    """

    step: int
    values: dict[str, float] = field(default_factory=dict)
    per_param: dict[str, tuple[tuple[str, ...], list[float]]] = field(default_factory=dict)

    def get(self, key: str, default: float | None = None) -> float | None:
        return self.values.get(key, default)

    def expand(self, family: str) -> dict[str, float]:
        """The family's values by stored key (``grad/norm/<name>``)."""
        names, values = self.per_param.get(family, ((), []))
        return {family + name: value for name, value in zip(names, values, strict=True)}
