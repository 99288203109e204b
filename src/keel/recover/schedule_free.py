"""Schedule-free optimizers (Defazio et al. 2024): parameters that move outside ``step()``.

They train at a point y and evaluate at the average x: ``optimizer.eval()`` moves every parameter from y to x in
place, ``optimizer.train()`` back, and the loop calls them between steps (facebookresearch/schedule_free's README:
``optimizer.eval()`` before evaluating and saving, ``optimizer.train()`` before training). A snapshot must be copied
before such a call (`keel.recover.recovery`) and hold the mode its parameters were copied in (`groups_in_mode_of`,
`object_modes`), or a resumed ``train()`` moves the restored y as if it were x.
"""

from __future__ import annotations

from typing import Any

MODE = "train_mode"


def swaps_weights(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or a part of an `Optimizers`) rewrites the parameters outside ``step()``: it has
    ``train()`` and ``eval()`` and says which point its parameters hold in ``train_mode`` — in every parameter group
    (``AdamWScheduleFree``, pytorch_optimizer's ``ScheduleFreeAdamW``) or on the object (``ScheduleFreeWrapper``).

    Example:
        >>> import torch
        >>> swaps_weights(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]))
        False
    """
    return any(
        callable(getattr(part, "train", None))
        and callable(getattr(part, "eval", None))
        and (
            isinstance(getattr(part, MODE, None), bool)
            or any(isinstance(g, dict) and MODE in g for g in getattr(part, "param_groups", ()))
        )
        for part in _parts(optimizer)
    )


def groups_in_mode_of(groups: list[dict[str, Any]], taken: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``groups`` (``state_dict()["param_groups"]`` read now) with each group's ``train_mode`` as in ``taken`` (read
    when the snapshot's parameters were copied). A snapshot completed later (its groups re-read for the loop's
    scheduler call) must not take the mode the loop switched to since: its parameters are those of the mode they
    were copied in, and a resumed ``train()`` trusts the mode to say which point it holds.

    Example:
        >>> groups_in_mode_of([{"lr": 0.2, "train_mode": False}], [{"lr": 0.1, "train_mode": True}])
        [{'lr': 0.2, 'train_mode': True}]
    """
    return [
        {**group, MODE: taken[i][MODE]} if i < len(taken) and MODE in taken[i] and MODE in group else group
        for i, group in enumerate(groups)
    ]


def object_modes(optimizer: Any) -> list[bool | None] | None:
    """Each part's ``train_mode`` kept on the optimizer object rather than in its groups (schedule_free's
    ``ScheduleFreeWrapper``, whose ``state_dict`` is its base optimizer's and so leaves the mode out), None for a
    part without one; None when no part has one."""
    modes = [getattr(part, MODE, None) for part in _parts(optimizer)]
    modes = [mode if isinstance(mode, bool) else None for mode in modes]
    return modes if any(mode is not None for mode in modes) else None


def set_object_modes(optimizer: Any, modes: list[bool | None] | None) -> None:
    """Give each part the ``train_mode`` `object_modes` read (a snapshot's): a resumed ``ScheduleFreeWrapper`` is
    new, in eval mode, and the loop's ``optimizer.train()`` would move the restored training point y as if it
    were x."""
    for part, mode in zip(_parts(optimizer), modes or (), strict=False):
        if isinstance(mode, bool) and isinstance(getattr(part, MODE, None), bool):
            setattr(part, MODE, mode)


def _parts(optimizer: Any) -> tuple[Any, ...]:
    """The optimizers a `keel.Optimizers` steps as one (its ``optimizers``), or ``optimizer`` alone."""
    parts = getattr(optimizer, "optimizers", None)
    return parts if isinstance(parts, tuple) else (optimizer,)
