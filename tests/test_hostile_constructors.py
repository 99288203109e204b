"""Public constructors against wrong types and values: one ValueError/TypeError naming the field, at once.

Every detector and signal probe registered in the catalog is built with a config of another type, with a config
and its fields together, and (detectors) with an int field past int64; each must be refused when it is made, not
with an AttributeError or OverflowError from inside it, nor later inside training.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch

from keel.detect.detector import DETECTORS
from keel.optim._registry import optimizers
from keel.signals.registry import PROBES


def _init(factory):
    return factory.__init__ if isinstance(factory, type) else factory


def _config_class(factory) -> type | None:
    annotation = typing.get_type_hints(_init(factory)).get("config")
    if annotation is None:
        return None
    return next(a for a in typing.get_args(annotation) or (annotation,) if a is not type(None))


COMPONENTS = {"detector": DETECTORS, "probe": PROBES}
# (family, name) -> (factory, config class) of every registered component that takes a config
CONFIGURED = {
    (family, name): (registry.get(name), _config_class(registry.get(name)))
    for family, registry in COMPONENTS.items()
    for name in registry
    if _config_class(registry.get(name)) is not None
}


def test_every_detector_but_the_argument_free_one_and_every_probe_with_settings_takes_a_config():
    assert {n for f, n in CONFIGURED if f == "detector"} == set(DETECTORS.names()) - {"non_finite_origin"}
    assert len([n for f, n in CONFIGURED if f == "probe"]) >= 12


class _Other:
    pass


def test_a_config_of_another_type_is_one_type_error_naming_config():
    """``SpikeDetector({"window": 5})`` raised AttributeError: 'dict' object has no attribute 'window';
    ``AttnLogitsProbe(config="x")`` was accepted."""
    wrong = {}
    for name, (factory, cls) in CONFIGURED.items():
        for value in ("window=5", {"window": 5}, 5, _Other()):
            try:
                factory(config=value)
            except TypeError as exc:
                if "config=" not in str(exc) or cls.__name__ not in str(exc):
                    wrong[name] = f"TypeError without the field and the allowed class: {exc}"
            except Exception as exc:  # noqa: BLE001 - any other is the finding
                wrong[name] = f"{type(exc).__name__}: {exc}"
            else:
                wrong[name] = f"accepted config={value!r}"
    assert wrong == {}


def _keyword_fields(factory) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(_init(factory)).parameters.values())


def _default_config(cls):
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.init]
    return None if required else cls()


def test_a_config_and_its_fields_together_are_refused_not_the_fields_dropped():
    """``ClipSaturationDetector(cfg, patience=9)`` built the detector from ``cfg`` and dropped ``patience``."""
    wrong = {}
    for name, (factory, cls) in CONFIGURED.items():
        config = _default_config(cls)
        if config is None or not _keyword_fields(factory):
            continue
        field = next(f for f in dataclasses.fields(cls) if f.init)
        try:
            factory(config=config, **{field.name: getattr(config, field.name)})
        except ValueError as exc:
            if field.name not in str(exc):
                wrong[name] = f"ValueError without the field: {exc}"
        except Exception as exc:  # noqa: BLE001
            wrong[name] = f"{type(exc).__name__}: {exc}"
        else:
            wrong[name] = "the fields were dropped"
    assert wrong == {}


PAST_INT64 = 2**64


def _int_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if f.init and hints.get(f.name) is int]


def test_an_int_field_past_int64_is_refused_when_the_config_is_made():
    """``SpikeConfig(window=2**64)`` was accepted; the detector then raised OverflowError (a deque's maxlen)."""
    wrong = {}
    for (family, name), (factory, cls) in CONFIGURED.items():
        if family != "detector" or _default_config(cls) is None:
            continue
        for field in _int_fields(cls):
            try:
                config = cls(**{field: PAST_INT64})
            except ValueError as exc:
                if field not in str(exc):
                    wrong[f"{cls.__name__}.{field}"] = f"ValueError without the field: {exc}"
                continue
            except Exception as exc:  # noqa: BLE001
                wrong[f"{cls.__name__}.{field}"] = f"{type(exc).__name__}: {exc}"
                continue
            try:
                factory(config)
            except Exception as exc:  # noqa: BLE001
                wrong[f"{cls.__name__}.{field}"] = f"accepted, then {name}: {type(exc).__name__}: {exc}"
            else:  # harmless today (a patience never reached), refused all the same: one rule for every count
                wrong[f"{cls.__name__}.{field}"] = "accepted"
    assert wrong == {}


def test_a_spike_signal_that_is_not_a_key_names_signal():
    """``SpikeDetector(signal=5)`` raised TypeError: argument of type 'int' is not iterable."""
    from keel.detect.spike import SpikeDetector

    for value in (5, 2.5, ["loss"], b"loss"):
        with pytest.raises(TypeError, match=r"SpikeDetector\(signal=.*allowed: a signal key"):
            SpikeDetector(signal=value)


@pytest.mark.parametrize(
    "name", [n for n in optimizers.names() if "betas" in inspect.signature(optimizers.get(n)).parameters]
)
@pytest.mark.parametrize("betas", [5, 0.9, None, {0.9: 0.99}])
def test_betas_that_are_not_a_pair_name_betas(name, betas):
    """``SPAM(params, betas=0.9)`` raised TypeError: object of type 'float' has no len()."""
    with pytest.raises(ValueError, match=r"\.betas=.*allowed: a pair"):
        optimizers.get(name)(torch.nn.Linear(2, 2).parameters(), betas=betas)


@pytest.mark.parametrize("base", ["adamw", 5, torch.nn.Linear, torch.optim.AdamW([torch.zeros(1)])])
def test_an_orthograd_base_that_is_not_an_optimizer_class_names_base(base):
    """``orthograd(params, base="adamw")`` raised TypeError: 'str' object is not callable."""
    with pytest.raises(TypeError, match=r"base=.*allowed: a torch\.optim\.Optimizer class"):
        optimizers.get("orthograd")(torch.nn.Linear(2, 2).parameters(), base=base)
