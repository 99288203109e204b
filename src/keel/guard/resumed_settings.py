"""A resume loads the optimizer's settings from the snapshot, as ``optimizer.load_state_dict`` does: an LR or betas the
loop changed on purpose for the continued run ("resume with a lower LR after the divergence") are replaced, inside
``Guard(...)``, where the loop cannot see it happen. `warn_replaced` names each one that changed, and which won."""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import Tensor

from keel._core.errors import KeelWarning

# The settings a loop sets on purpose. ``lr`` moves with a scheduler (its peak is ``initial_lr``); IndependentAdamW
# derives ``weight_decay`` from ``independent_weight_decay`` at every step.
SETTINGS = (
    "lr",
    "initial_lr",
    "betas",
    "eps",
    "weight_decay",
    "independent_weight_decay",
    "momentum",
    "dampening",
    "nesterov",
    "amsgrad",
    "maximize",
)


def optimizer_settings(optimizer: Any, *, scheduled: bool) -> list[dict[str, Any]]:
    """Each parameter group's settings a loop sets on purpose, as plain values."""
    skip = {"lr"} if scheduled else set()
    groups = []
    for group in optimizer.param_groups:
        derived = {"weight_decay"} if "independent_weight_decay" in group else set()
        groups.append({k: _plain(group[k]) for k in SETTINGS if k in group and k not in skip | derived})
    return groups


def warn_replaced(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """One warning naming the settings the snapshot replaced (none: nothing said)."""
    changes = [
        f"group {g} {key} {_show(old[key])} → {_show(new[key])}"
        for g, (old, new) in enumerate(zip(before, after, strict=False))
        for key in old
        if key in new and not _same(old[key], new[key])
    ]
    if changes:
        warnings.warn(
            "resume: the snapshot's optimizer settings replace those this run was built with: "
            f"{'; '.join(changes[:8])}{' …' if len(changes) > 8 else ''}. To continue with new ones, set them after "
            "the Guard is built (optimizer.param_groups[i][...] = ..., or the scheduler's base_lrs)",
            KeelWarning,
            stacklevel=4,
        )


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()  # once, at a resume
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
