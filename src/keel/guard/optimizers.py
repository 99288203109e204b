"""Several optimizers (and their schedulers) as the one a `Guard` steps, skips and restores.

Muon recipes train the matrices with Muon and the embeddings, head and gains with AdamW (modded-nanogpt, Moonlight,
Kimi): one backward, then every optimizer steps. keel must decide once per update for all of them — a skip that
stepped one optimizer, or a rollback that restored one, would leave the model half updated — so `Optimizers` makes
them one:

    guard = keel.Guard(model, keel.Optimizers(adamw, muon), keel.Schedulers(adamw_sched, muon_sched))

``keel.watch(model, [adamw, muon], [adamw_sched, muon_sched])`` builds these from the loop's own objects.

`Optimizers` holds no state of its own: ``param_groups`` and ``state`` are views of the parts' (an LR written into
a group reaches the part; keel's LR back-off scales every part), ``step``/``zero_grad`` call each part in order, and
``state_dict`` is in torch's layout (parameters numbered on across the parts), so keel snapshots it like any
optimizer. It is for the parts of one update: a loop that runs a backward of its own per optimizer (a GAN's
generator and discriminator) needs a Guard per model and optimizer: ``keel.watch(netD, optD)`` and
``keel.watch(netG, optG)``, each taking the losses of its own update. Each part needs torch's ``state_dict`` layout
(every ``torch.optim.Optimizer`` subclass has it, Muon included); ``sync="deferred"`` needs one fused optimizer and
refuses a group.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

from torch import Tensor
from torch.optim import Optimizer


class Optimizers(Optimizer):
    """Several optimizers stepped, skipped, snapshotted and restored as one (see the module docstring).

    An ``Optimizer`` by type, so that it goes wherever one does, but its state lives in its parts: torch's
    ``Optimizer.__init__`` (which would make groups and state of its own) is not called.

    Args:
        *optimizers: Two or more optimizers over disjoint parameters, in the order the loop steps them.

    Raises:
        ValueError: Fewer than two, one that is not an optimizer, or a parameter in two of them.
    """

    def __init__(self, *optimizers: Any) -> None:  # noqa: D107 - torch's __init__ deliberately not called
        if len(optimizers) < 2:
            raise ValueError(f"Optimizers({len(optimizers)} optimizer(s)); allowed: two or more optimizers")
        owners: dict[int, int] = {}
        for i, opt in enumerate(optimizers):
            if not (hasattr(opt, "step") and hasattr(opt, "param_groups") and hasattr(opt, "state_dict")):
                raise ValueError(
                    f"Optimizers: argument {i} is {type(opt).__name__}; allowed: torch.optim.Optimizer instances"
                )
            for group in opt.param_groups:
                for p in group["params"]:
                    if owners.setdefault(id(p), i) != i:
                        raise ValueError(
                            f"Optimizers: a parameter of shape {tuple(p.shape)} is in optimizers {owners[id(p)]} "
                            f"and {i}; allowed: optimizers over disjoint parameters"
                        )
        self.optimizers = tuple(optimizers)
        self.state = _UnionState(self.optimizers)  # type: ignore[assignment]  # a mapping over the parts

    @property  # a live view, not a stored list
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Every part's groups, in order (the parts' own dicts: writes reach them)."""
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property  # the first part's
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return dict(self.optimizers[0].defaults)

    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Step each part in order (no closure: each part would run it again)."""
        if closure is not None:
            raise ValueError("Optimizers.step(closure): allowed: step() without a closure")
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout over all the parts: parameters numbered on from one part to the next."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.optimizers:
            part = opt.state_dict()
            for group in part["param_groups"]:
                groups.append({**group, "params": [offset + i for i in group["params"]]})
            state.update({offset + i: s for i, s in part["state"].items()})
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Give each part its share of a `state_dict` of this group (same parts, same order)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"Optimizers.load_state_dict: {len(groups)} param groups; allowed: {len(self.param_groups)}, "
                "the groups of these optimizers"
            )
        offset, start = 0, 0
        for opt in self.optimizers:
            mine = groups[start : start + len(opt.param_groups)]
            count = sum(len(g["params"]) for g in opt.param_groups)
            part_state = {i - offset: s for i, s in state_dict["state"].items() if offset <= i < offset + count}
            opt.load_state_dict(
                {
                    "state": part_state,
                    "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine],
                }
            )
            start, offset = start + len(opt.param_groups), offset + count

    def __getstate__(self) -> dict[str, Any]:  # torch's Optimizer pickling expects the state it would have made
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Optimizers({', '.join(type(o).__name__ for o in self.optimizers)})"


class Schedulers:
    """Several LR schedulers stepped, snapshotted and restored as one (one per part of an `Optimizers`)."""

    def __init__(self, *schedulers: Any) -> None:
        if not schedulers:
            raise ValueError("Schedulers(): allowed: one or more LR schedulers")
        for i, s in enumerate(schedulers):
            if not (hasattr(s, "step") and hasattr(s, "state_dict") and hasattr(s, "load_state_dict")):
                raise ValueError(
                    f"Schedulers: argument {i} is {type(s).__name__}; allowed: LR schedulers (step, state_dict, "
                    "load_state_dict)"
                )
        self.schedulers = tuple(schedulers)

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict[str, Any]:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for s, part in zip(self.schedulers, state_dict["schedulers"], strict=True):
            s.load_state_dict(part)

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers for lr in s.get_last_lr()]


class _UnionState(MutableMapping):
    """The parts' ``state`` as one mapping from parameter to its state (read live: a part's load_state_dict
    replaces its dict)."""

    def __init__(self, optimizers: tuple[Any, ...]) -> None:
        self._optimizers = optimizers

    def _owner(self, p: Tensor) -> dict[Any, Any]:
        for opt in self._optimizers:
            if p in opt.state or any(p is q for g in opt.param_groups for q in g["params"]):
                return opt.state
        raise KeyError(p)

    def __getitem__(self, p: Tensor) -> Any:
        for opt in self._optimizers:
            if p in opt.state:
                return opt.state[p]
        raise KeyError(p)

    def __setitem__(self, p: Tensor, value: Any) -> None:
        self._owner(p)[p] = value

    def __delitem__(self, p: Tensor) -> None:
        del self._owner(p)[p]

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)

    def clear(self) -> None:
        for opt in self._optimizers:
            opt.state.clear()
