"""The record of the stabilizers `keel.stabilize` applied to a model: plain data, kept on the model.

Plain data (lists, dicts, str, numbers, None) so it can sit next to a state dict in a checkpoint, in JSON or
in ``torch.save`` output that ``torch.load(weights_only=True)`` reads without unpickling code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from keel.nn.stabilizers import Stabilizer, stabilizers

# Where `stabilize` keeps a model's record: a plain attribute, so it follows the model through deepcopy and
# pickling but never into its state dict (which stays tensors only, as exporters and sharded savers expect).
RECORD_ATTR = "_keel_stabilize_record"
NAME_KEY = "stabilizer"
# Records saved before keel called these stabilizers name each entry's under "remedy"; they still load.
LEGACY_NAME_KEY = "remedy"


def entry_of(stabilizer: Stabilizer) -> dict[str, Any]:
    """One record entry: ``{"stabilizer": name, <option>: value, ...}``, tuples written as lists (as JSON does)."""
    options: dict[str, Any] = {}
    if dataclasses.is_dataclass(stabilizer):
        for f in dataclasses.fields(stabilizer):
            value = getattr(stabilizer, f.name)
            options[f.name] = list(value) if isinstance(value, tuple) else value
    return {NAME_KEY: stabilizer.name, **options}


def remember(model: nn.Module, stabilizer: Stabilizer) -> None:
    """Append ``stabilizer`` to the model's record, unless the same entry is already there (a re-application)."""
    record = model.__dict__.setdefault(RECORD_ATTR, [])
    entry = entry_of(stabilizer)
    if entry not in record:
        record.append(entry)


def record_of(model: nn.Module) -> list[dict[str, Any]]:
    """A copy of the model's record (empty for a model `stabilize` has not changed)."""
    return [dict(entry) for entry in model.__dict__.get(RECORD_ATTR, [])]


def stabilizers_of(record: Any) -> list[Stabilizer]:
    """The stabilizers a record describes, in its order; validates all of it before anything is applied.

    Raises:
        ValueError: naming the bad entry or option and what is allowed.
    """
    if not isinstance(record, (list, tuple)):
        raise ValueError(f"record={record!r}; allowed: a list of dicts, as keel.nn.stabilize_record(model) returns")
    return [_stabilizer(i, entry) for i, entry in enumerate(record)]


def _stabilizer(i: int, entry: Any) -> Stabilizer:
    if not isinstance(entry, Mapping):
        raise ValueError(f"record[{i}]={entry!r}; allowed: a dict like {{'stabilizer': 'qk_norm', 'norm': 'rms'}}")
    key = NAME_KEY if NAME_KEY in entry else LEGACY_NAME_KEY if LEGACY_NAME_KEY in entry else None
    if key is None:
        raise ValueError(f"record[{i}]={dict(entry)!r} has no {NAME_KEY!r}; allowed: {{'stabilizer': <name>, ...}}")
    name = entry[key]
    if not isinstance(name, str) or name not in stabilizers:
        raise ValueError(f"record[{i}][{key!r}]={name!r}; allowed: one of {', '.join(stabilizers.names())}")
    factory = stabilizers.get(name)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items() if k != key}
    if dataclasses.is_dataclass(factory):
        allowed = [f.name for f in dataclasses.fields(factory) if f.init]
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise ValueError(f"record[{i}] option {unknown[0]!r}; allowed: {', '.join(allowed)}")
    try:
        return stabilizers.create(name, **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"record[{i}]: {error}") from None
