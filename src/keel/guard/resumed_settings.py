"""A resume loads the optimizer's settings from the snapshot, as ``optimizer.load_state_dict`` does: an LR or betas the
loop changed on purpose for the continued run ("resume with a lower LR after the divergence") are replaced, inside
``Guard(...)``, where the loop cannot see it happen. `ResumedSettings` names, at the first update after the resume,
each one that changed and that the loop has not set again since, and which won."""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import Tensor

from keel._core.caller import loop_stacklevel
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


class ResumedSettings:
    """The optimizer settings a resume loaded from the snapshot, judged at the first update after it (`warn_left`):
    a loop that writes its own LR or momentum into ``param_groups`` before every update (nanochat's
    ``group["lr"] = group["initial_lr"] * lrm`` and Muon momentum warm-up, modded-nanogpt's) has replaced the
    snapshot's by then (told at the resume, it was asked to do what it does)."""

    def __init__(self, optimizer: Any, built: list[dict[str, Any]], *, scheduled: bool) -> None:
        self._optimizer, self._built = optimizer, built
        self._restored = optimizer_settings(optimizer, scheduled=scheduled)
        # the very objects: a loop's write puts a new one there, also where its value is the snapshot's (a step
        # schedule's flat part)
        groups = zip(optimizer.param_groups, self._restored, strict=True)
        self._objects = [{key: group[key] for key in restored} for group, restored in groups]

    def warn_left(self) -> None:
        """Warn once about the settings the loop left as the snapshot's where they differ from those it was built
        with: not written since the resume (the same object, with the same value: a tensor is written in place)."""
        now = self._optimizer.param_groups
        left = [
            {k: v for k, v in restored.items() if k in group and group[k] is objects[k] and _same(_plain(group[k]), v)}
            for group, restored, objects in zip(now, self._restored, self._objects, strict=False)
        ]
        warn_replaced(self._built, left)


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
            stacklevel=loop_stacklevel(),
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
