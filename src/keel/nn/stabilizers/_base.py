"""What a stabilizer is, what applying one records, and the registry of stabilizers (name = file stem)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from keel._core import KeelWarning, Registry


class StabilizerNoEffectWarning(KeelWarning):
    """A stabilizer given to `keel.stabilize` found nothing it knows how to change in the model."""


class NoDecayGroupWarning(KeelWarning):
    """`keel.stabilize` could not keep its new 1-D parameters out of weight decay without breaking an LR
    scheduler already built over the optimizer, so they decay with their neighbours."""


@dataclass(frozen=True, kw_only=True)
class Change:
    """One modification a stabilizer made.

    Attributes:
        stabilizer: The stabilizer's registry name.
        name: Qualified name of the module changed (``""`` for the model itself).
        old: The module that was there before.
        new: The module there now (the same object when it was changed in place: hooks, parametrizations).
        how: What was done, in words.
        anchor: An existing parameter next to which new parameters belong in an optimizer's groups.
        new_parameters: Parameters the change created (norm gains, σReparam's γ ...).
        handles: Hook handles the change registered.
        extra: A stabilizer-specific object, e.g. the `ZLossHook` a training loop needs.
    """

    stabilizer: str
    name: str
    old: nn.Module
    new: nn.Module
    how: str
    anchor: Tensor | None = None
    new_parameters: tuple[nn.Parameter, ...] = ()
    handles: tuple[RemovableHandle, ...] = field(default=())
    extra: Any = None


class Stabilizer(Protocol):
    """A stabilizer that `keel.stabilize` can apply: a config (its fields) plus ``apply``."""

    name: ClassVar[str]
    description: ClassVar[str]
    reference: ClassVar[str]
    order: ClassVar[int]  # application order when several are requested; lower first

    def apply(self, model: nn.Module) -> list[Change]: ...


stabilizers: Registry[Stabilizer] = Registry("stabilizer")
