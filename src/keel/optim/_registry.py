"""The optimizer registry: name (the defining file's stem) → constructor ``(params, **kwargs)``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from keel._core import Registry

optimizers: Registry[Optimizer] = Registry("optimizer")


def list_optimizers() -> list[str]:
    """Names of keel's optimizers: ``create_optimizer(name, params, **kwargs)`` builds each."""
    return optimizers.names()


def create_optimizer(name: str, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> Optimizer:
    """Build a keel optimizer by name, e.g. ``create_optimizer("stable_spam", model.parameters(), lr=1e-3)``.

    ``"orthograd"`` wraps ``torch.optim.AdamW`` unless ``base=`` names another optimizer class.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    return optimizers.create(name, params=params, **kwargs)
