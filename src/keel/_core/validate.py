"""Validation helpers for component configs: one clear ValueError naming the field, the value and what is allowed."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from keel._core.argtypes import INT64_MAX

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C")


def config_from(
    owner: object,
    cls: type[C],
    config: object,
    fields: Mapping[str, object],
    build: Callable[..., C] | None = None,
) -> C:
    """A component's config: ``config`` when given, else one built from ``fields`` (``build``, by default ``cls``).

    ``config`` of another type (a dict, a str, another component's config) raised an AttributeError deep in
    the component, or later inside training; ``config`` and fields together silently dropped the fields.
    Both are one clear error here.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(kw_only=True)
        ... class WindowConfig:
        ...     window: int = 20
        >>> class WindowDetector:
        ...     def __init__(self, config=None, **fields):
        ...         self.config = config_from(self, WindowConfig, config, fields)
        >>> WindowDetector(window=5).config
        WindowConfig(window=5)
        >>> WindowDetector({"window": 5})
        Traceback (most recent call last):
        ...
        TypeError: WindowDetector(config={'window': 5}); allowed: a WindowConfig or None (or its fields as keywords)
    """
    name = type(owner).__name__
    if config is None:
        return (build or cls)(**fields)
    if not isinstance(config, cls):
        allowed = f"a {cls.__name__} or None (or its fields as keywords)"
        raise TypeError(f"{name}(config={config!r}); allowed: {allowed}")
    if fields:
        given = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        raise ValueError(f"{name}(config=…, {given}): the fields would be ignored; allowed: a config or its fields")
    return config


def refuse_closure_only(owner: str, optimizer: object) -> None:
    """Raise ValueError naming ``optimizer`` when its ``step`` cannot be called without arguments: a closure that
    re-evaluates the loss is required (``torch.optim.LBFGS``, SAM-style optimizers), and ``owner`` steps it with
    none. The class's ``step`` is read, not the instance's: an LR scheduler replaces that with a wrapper whose
    signature is the unbound function's (``self`` required); a signature that cannot be read passes."""
    try:
        _, *parameters = inspect.signature(type(optimizer).step).parameters.values()  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if any(p.default is inspect.Parameter.empty and p.kind not in variadic for p in parameters):
        name = type(optimizer).__name__
        raise ValueError(
            f"{owner}: {name}.step needs a closure (it re-evaluates the loss itself), which {owner} cannot "
            "pass; allowed: an optimizer whose step() takes no arguments (torch.optim.SGD, AdamW, keel.optim's)"
        )


def require_ints(config: object, *fields: str, minimum: int = 1) -> None:
    """Raise ValueError unless each named field of ``config`` is an int >= ``minimum`` (and at most 2**63 - 1).

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
        if value > INT64_MAX:  # a window's deque or a step count past int64 failed later, with an OverflowError
            raise ValueError(f"{type(config).__name__}.{name}={value!r}; allowed: an int from {minimum} to 2**63 - 1")


def require_choices(config: object, field: str, allowed: Sequence[str]) -> None:
    """Raise ValueError unless the named field of ``config`` is one or more of ``allowed``; keep each once, in order.

    Example:
        >>> from types import SimpleNamespace
        >>> require_choices(SimpleNamespace(kinds=("a", "z")), "kinds", ("a", "b"))
        Traceback (most recent call last):
        ...
        ValueError: SimpleNamespace.kinds=('a', 'z'); allowed: one or more of a, b
    """
    chosen = tuple(dict.fromkeys(getattr(config, field)))
    if not chosen or any(c not in allowed for c in chosen):
        raise ValueError(f"{type(config).__name__}.{field}={chosen!r}; allowed: one or more of {', '.join(allowed)}")
    setattr(config, field, chosen)


def require_positive(config: object, *fields: str) -> None:
    """Raise ValueError unless each named field of ``config`` is a finite number > 0."""
    for name in fields:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{type(config).__name__}.{name}={value!r}; allowed: a finite number > 0")


def check_types(config: DataclassInstance) -> None:
    """Raise ValueError for the first field of a dataclass config whose value does not fit its annotation.

    Understood annotations: ``int`` (not bool), ``float`` (an int or float, not bool, not NaN), ``str``, ``bool``,
    ``Literal[...]``, ``X | None``, and ``tuple[X, ...]``, ``list[X]``, ``Sequence[X]`` (each a list or tuple) of
    those; richer ones (``Any``, callables, classes) are left to the config's own checks. Call it first in
    ``__post_init__``; range checks follow.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(kw_only=True)
        ... class WindowConfig:
        ...     window: int = 20
        ...     def __post_init__(self) -> None:
        ...         check_types(self)
        >>> WindowConfig(window="20")
        Traceback (most recent call last):
        ...
        ValueError: WindowConfig.window='20'; allowed: an int
    """
    hints = _type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in hints and _fits(hints[field.name], value) is False:
            raise ValueError(f"{type(config).__name__}.{field.name}={value!r}; allowed: {_describe(hints[field.name])}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(annotation: Any, value: object) -> bool | None:
    """True/False when ``annotation`` is understood, None when it is not."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        verdicts = [_fits(a, value) for a in args]
        return True if True in verdicts else None if None in verdicts else False
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if (origin is tuple and len(args) == 2 and args[1] is Ellipsis) or origin in (list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):  # a list where a tuple is annotated is what users type
            return False
        verdicts = [_fits(args[0], v) for v in value]
        return False if False in verdicts else None if None in verdicts else True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if annotation is str:
        return isinstance(value, str)
    return None


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        described = " or ".join(_describe(a) for a in rest)
        return f"None or {described}" if len(rest) < len(args) else described
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        return f"a list of {_describe(args[0])}"
    return {bool: "True or False", int: "an int", float: "a number (not NaN)", str: "a str"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )
