"""Validation helpers for component configs: one clear ValueError naming the field, the value and what is allowed."""

from __future__ import annotations

import math


def require_ints(config: object, *fields: str, minimum: int = 1) -> None:
    """Raise ValueError unless each named field of ``config`` is an int >= ``minimum``.

    Example:
        >>> from types import SimpleNamespace
        >>> require_ints(SimpleNamespace(window=0), "window")
        Traceback (most recent call last):
        ...
        ValueError: SimpleNamespace.window=0; allowed: an int >= 1
    """
    for name in fields:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{type(config).__name__}.{name}={value!r}; allowed: an int >= {minimum}")


def require_positive(config: object, *fields: str) -> None:
    """Raise ValueError unless each named field of ``config`` is a finite number > 0."""
    for name in fields:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{type(config).__name__}.{name}={value!r}; allowed: a finite number > 0")
