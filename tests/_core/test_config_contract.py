"""Every component config of keel: a value of the wrong type or out of range is one ValueError naming
``Class.field``; nothing else escapes and nothing is silently accepted (issue 12: argument surfaces).

Configs are found by walking keel's modules, so a new config is covered without being listed here.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keel

SKIP_MODULES = ("keel.integrations", "keel.cli")  # optional extras; thin shells


def _configs() -> list[type]:
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(keel.__path__, "keel."):
        if info.name.startswith(SKIP_MODULES):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.endswith("Config") and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                found[f"{obj.__module__}.{name}"] = obj
    return [found[k] for k in sorted(found)]


CONFIGS = _configs()


def _accepts(annotation: object, value: object) -> bool | None:
    """Whether ``value`` fits ``annotation``; None when the annotation is too rich to judge here."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        verdicts = [_accepts(a, value) for a in args]
        return True if any(v is True for v in verdicts) else None if None in verdicts else False
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.integers(),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.just(object()),
)


def _required(config: type) -> dict[str, object]:
    """A plain valid value for each field without a default (a detector's signal and kind)."""
    hints = typing.get_type_hints(config)
    examples = {str: "loss", int: 1, float: 1.0, bool: False}
    return {
        f.name: examples[hints[f.name]]
        for f in dataclasses.fields(config)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_defaults_construct(config):
    config(**_required(config))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_junk_is_one_value_error_naming_the_field(config, data):
    hints = typing.get_type_hints(config)
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(config) if f.init]))
    value = data.draw(_JUNK)
    try:
        built = config(**{**_required(config), field: value})
    except ValueError as exc:
        assert f"{config.__name__}." in str(exc) and "allowed" in str(exc), str(exc)
        return
    verdict = _accepts(hints[field], value)
    assert verdict is not False, f"{config.__name__}({field}={value!r}) was accepted; its type is {hints[field]}"
    got = getattr(built, field)
    if isinstance(got, float):
        assert not math.isnan(got) or field in ALLOWS_NAN, f"{config.__name__}.{field}=nan accepted"


ALLOWS_NAN: set[str] = set()
