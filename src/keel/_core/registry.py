"""Registry: name → factory, where the name equals the defining file's stem."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A small name → factory table, one per component family (detectors, probes, stabilizers ...).

    Example:
        >>> detectors: Registry[object] = Registry("detector")
        >>> @detectors.register("spike")
        ... class SpikeDetector: ...
        >>> detectors.create("spike")  # doctest: +ELLIPSIS
        <...SpikeDetector object at ...>
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.family} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return add

    def create(self, name: str, **kwargs: object) -> T:
        return self.get(name)(**kwargs)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            raise ValueError(f"unknown {self.family} {name!r}; allowed: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
