"""The loop's own signals: ``Guard.step(loss, signals={...})`` — values keel cannot measure from the model.

A DPO loop knows its chosen and rejected log-probabilities, a GRPO loop its rewards, entropy and clip fractions;
keel's probes see only parameters, gradients and hooked activations. The loop hands such values to `Guard.step`
and keel treats them as its own: tensors stay on the device and ride in the step's one host copy, plain numbers
join the host values, and detectors, the store and the report read them by key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import torch
from torch import Tensor

from keel.signals.probe import Measurements

# Keys keel writes itself: a loop's signal under one of these names would silently replace keel's measurement.
_RESERVED = ("loss", "lr")
_RESERVED_PREFIXES = ("lr/", "grad/", "param/", "update/", "time/", "amp/", "keel/")


def split_signals(signals: Mapping[str, object] | None, device: torch.device) -> tuple[Measurements, dict[str, float]]:
    """The loop's signals, checked: (0-d tensors on ``device``, plain numbers as floats).

    Raises:
        ValueError: ``signals`` is not a mapping; a key that is empty, not a str or one of keel's own keys; a
            value that is neither a one-element real tensor nor a real number. The message names the key and
            the value, and what is allowed.

    Example:
        >>> on_device, on_host = split_signals({"dpo/margin": torch.tensor(0.5), "reward/mean": 2}, torch.device("cpu"))
        >>> on_device, on_host
        ({'dpo/margin': tensor(0.5000)}, {'reward/mean': 2.0})
    """
    if signals is None:
        return {}, {}
    if not isinstance(signals, Mapping):
        raise ValueError(
            f"signals={_short(signals)}; allowed: a dict of signal key → a 0-d tensor or a real number, or None"
        )
    on_device: Measurements = {}
    on_host: dict[str, float] = {}
    for key, value in signals.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"signals key {key!r}; allowed: a non-empty str such as 'dpo/margin'")
        if _reserved(key):
            raise ValueError(
                f"signals key {key!r} is one keel measures itself; allowed: any other name, e.g. a prefix of "
                f"your own ('dpo/', 'grpo/', 'reward/'); reserved: {', '.join(_RESERVED + _RESERVED_PREFIXES)}"
            )
        if isinstance(value, Tensor):
            if value.is_meta:  # no data to read: a value computed on a model built on the meta device
                raise ValueError(
                    f"signals[{key!r}] is a tensor on the meta device (it holds no value); allowed: a real tensor "
                    "or number, computed on the device the model trains on"
                )
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(
                    f"signals[{key!r}] is a {value.dtype} tensor of shape {tuple(value.shape)}; allowed: one real "
                    "value (a 0-d tensor, e.g. rewards.mean())"
                )
            on_device[key] = value.detach().reshape(()).to(device, non_blocking=True)
        elif isinstance(value, Real) and not isinstance(value, bool):
            on_host[key] = _as_float(value)
        else:
            raise ValueError(
                f"signals[{key!r}] = {_short(value)} ({type(value).__name__}); allowed: a 0-d tensor or a real "
                "number (NaN and Inf are values, and are recorded as such)"
            )
    return on_device, on_host


def _as_float(value: Real) -> float:
    """``value`` as a float; an int or fraction beyond float range is ±Inf, a value like any other (``10**400``)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]  # (Real declares no comparison)


def _reserved(key: str) -> bool:
    return key in _RESERVED or key.startswith(_RESERVED_PREFIXES)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
