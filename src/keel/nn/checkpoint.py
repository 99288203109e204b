"""Checkpoints of a stabilized model: the record of its stabilizers, and loading a state dict through it.

A state dict of a model `keel.stabilize` changed has the stabilizers' keys (``q_norm.weight``,
``parametrizations.weight.original`` ...), so it loads only into a model changed the same way: build the
plain model, re-apply the same stabilizers with the same options, then load. The record says which.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from keel.nn._record import entry_of, record_of, stabilizers_of
from keel.nn.dense_to_sparse_gate import UPDATE_BUFFER
from keel.nn.stabilize import StabilizeResult, stabilize

# Pieces of state-dict keys that keel.stabilize's stabilizers introduce: the QK-norm modules, parametrizations
# (σReparam), ScaleLong's calibration. A hint for the error message only: a model may have its own q_norm.
STABILIZER_KEY_PARTS = ("q_norm.", "k_norm.", "parametrizations.", "long_skip_calibration")
EXAMPLES = 3  # keys an error message names before "..."


def stabilize_record(model: nn.Module) -> list[dict[str, Any]]:
    """The stabilizers `keel.stabilize` applied to ``model``, in order, with their options: save it next to the
    state dict.

    One entry per stabilizer that changed something, over every `stabilize` call on this module object, e.g.
    ``{"stabilizer": "qk_norm", "norm": "layer", "eps": 1e-05, "bias": None}``. Plain data (JSON, and
    ``torch.load(weights_only=True)``). The record lives on the module given to `stabilize`, not in its state
    dict; a copy is returned.

    Example:
        >>> model = nn.TransformerEncoderLayer(16, 4, batch_first=True)
        >>> _ = stabilize(model, ["qk_norm"])
        >>> stabilize_record(model)
        [{'stabilizer': 'qk_norm', 'norm': 'layer', 'eps': 1e-05, 'bias': None}]
    """
    return record_of(model)


def load_stabilized(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    record: list[dict[str, Any]],
    *,
    optimizer: Optimizer | None = None,
) -> StabilizeResult:
    """Re-apply a checkpoint's stabilizers to a freshly built model (and its optimizer), then load its state dict.

    Use it to resume or sample from a checkpoint of a stabilized model: build the model and optimizer as the
    training run did, in the same order relative to `stabilize` (so the new parameters land at the same
    places in the optimizer's groups), call this, then ``optimizer.load_state_dict(...)``. Each entry is
    re-applied by its own `stabilize` call, in the record's order, as the run applied them. A model that
    already carries this record is only loaded.

    Args:
        model: A freshly built, plain model (or one already stabilized with the same record).
        state_dict: The saved ``model.state_dict()``.
        record: The saved `stabilize_record` (``[]`` for a plain checkpoint).
        optimizer: The optimizer to give the new parameters to, as `stabilize` does.

    Returns:
        What the re-application changed (``result.z_loss()`` for the loss when z-loss is in the record).

    Raises:
        ValueError: one line, before anything is loaded — a bad record (nothing applied either), a model
            stabilized with another record, or a state dict that does not fit the re-stabilized model (its
            keys or shapes; then the model keeps the re-applied stabilizers but none of the saved values).

    Example:
        >>> saved = nn.TransformerEncoderLayer(16, 4, batch_first=True)
        >>> _ = stabilize(saved, ["qk_norm"])
        >>> fresh = nn.TransformerEncoderLayer(16, 4, batch_first=True)
        >>> _ = load_stabilized(fresh, saved.state_dict(), stabilize_record(saved))
        >>> type(fresh.self_attn).__name__
        'QKNormMultiheadAttention'
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"load_stabilized: state_dict is a {type(state_dict).__name__}; allowed: a mapping of names to "
            "tensors, as model.state_dict() returns"
        )
    stabilizers = stabilizers_of(record)
    entries = [entry_of(r) for r in stabilizers]
    applied = record_of(model)
    if applied and applied != entries:
        raise ValueError(
            f"load_stabilized: {type(model).__name__} is already stabilized with [{_names(applied)}]; allowed: "
            f"a freshly built model, or one stabilized with the record given [{_names(entries)}]"
        )
    result = StabilizeResult()
    if not applied:
        for stabilizer in stabilizers:
            step = stabilize(model, [stabilizer], optimizer=optimizer)
            result.changes.extend(step.changes)
            result.unmatched.extend(step.unmatched)
    _check_fits(model, state_dict, entries)
    model.load_state_dict(state_dict)
    return result


def _names(entries: list[dict[str, Any]]) -> str:
    return ", ".join(str(e["stabilizer"]) for e in entries)


def _check_fits(model: nn.Module, state_dict: Mapping[str, Any], entries: list[dict[str, Any]]) -> None:
    """Raise one ValueError naming what differs, instead of torch's list of every missing and unexpected key."""
    cls = type(model).__name__
    own = model.state_dict()
    extra = [k for k in state_dict if k not in own]
    # a dense_to_sparse router's update count, saved since session 11: an older checkpoint lacks it, and the router's
    # own load hook keeps the count where it is and warns
    lacking = [k for k in own if k not in state_dict and not k.endswith(UPDATE_BUFFER)]
    reshaped = [k for k in own if isinstance(state_dict.get(k), Tensor) and state_dict[k].shape != own[k].shape]
    if not (extra or lacking or reshaped):
        return
    parts = []
    if extra:
        parts.append(f"it has {len(extra)} keys the model does not ({_some(extra)})")
    if lacking:
        parts.append(f"it lacks {len(lacking)} keys the model has ({_some(lacking)})")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} keys have another shape ({k}: {tuple(state_dict[k].shape)} saved, "
            f"{tuple(own[k].shape)} here)"
        )
    saved_with = "the record saved with it (keel.nn.stabilize_record(model) at save time)"
    if any(_from_stabilizer(k) for k in extra):
        hint = (
            "it was saved from a model changed by keel.stabilize with stabilizers the record does not list; "
            f"allowed: {saved_with}"
        )
    elif any(_from_stabilizer(k) for k in lacking):
        hint = f"the record lists stabilizers or options the state_dict was not saved with; allowed: {saved_with}"
    else:
        hint = f"allowed: a state_dict saved from a {cls} with the record given"
    after = f" after re-applying [{_names(entries)}]" if entries else ""
    raise ValueError(f"load_stabilized: state_dict does not fit {cls}{after}: {'; '.join(parts)}; {hint}")


def _from_stabilizer(key: str) -> bool:
    return any(part in key for part in STABILIZER_KEY_PARTS)


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:EXAMPLES]) + (", ..." if len(keys) > EXAMPLES else "")
