"""What a snapshot holds, split into tensors (copied in bulk) and small plain data (copied at once).

`TrainingState` names the objects of one training run; `capture_plain` and `restore` read and write the
parts of their state that are small (scheduler, GradScaler, detector baselines, the run's recovery history,
RNG, data position), and `tensor_sources` lists the large tensors (the parameters training can change, buffers,
optimizer moments) for the bulk copy; `fixed_parameters` lists the parameters it leaves out (`keel.recover.fixed`).

Each part has a role that says when it is restored. A rollback goes back to the training state of an earlier
step but keeps the run's own history (how often it rolled back, the actions in force) and its data position;
a resume after the process died restores everything.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from keel.recover.fixed import FixedTensor, trained_ids
from keel.recover.schedule_free import object_modes, set_object_modes


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingState:
    """The objects whose state a snapshot captures.

    Attributes:
        model: Parameters and buffers.
        optimizer: Its ``state_dict`` (moments and step counts as tensors, hyper-parameters as plain data).
        scheduler: Optional LR scheduler.
        scaler: Optional ``torch.amp.GradScaler``.
        components: Other stateful parts of the training state by name (detector baselines): restored on
            rollback and on resume.
        history: The run's record of its own recovery by name (the escalation ladder's counts of skips and
            rollbacks, the actions in force, the snapshot schedule). Restored on resume, not on rollback:
            the counters that stop the ladder from looping, and the LR back-off that compounds over repeated
            rollbacks, must outlive the rollbacks they count.
        tracked: The data position: objects with ``state_dict``/``load_state_dict`` registered by the user
            (a sampler, a stateful loader). Restored on resume, not on rollback, which moves on to fresh data.
        averaged: Averages of the model's weights the loop keeps beside it, by name (a model EMA: timm's
            ``ModelEmaV3``, ``torch.optim.swa_utils.AveragedModel``, diffusers' ``EMAModel``): restored on rollback
            and on resume. The loop updates them after ``optimizer.step()``, so a snapshot takes them at keel's
            next call (`capture_averaged`, called by `keel.recover.Recovery.complete_snapshot`): the average of the
            update the snapshot's model came from.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None = None
    scaler: Any | None = None
    components: dict[str, Stateful] = field(default_factory=dict)
    history: dict[str, Stateful] = field(default_factory=dict)
    tracked: dict[str, Stateful] = field(default_factory=dict)
    averaged: dict[str, Any] = field(default_factory=dict)  # an nn.Module, or one with shadow_params (diffusers)
    # the host tensors of the averages of a snapshot the ring has evicted for good, for the next capture to reuse
    spare_averaged: dict[str, dict[str, Any]] | None = field(default=None, repr=False)


def capture_averaged(state: TrainingState) -> dict[str, dict[str, Any]]:
    """Host copies of the model averages' ``state_dict`` by name (`TrainingState.averaged`), written into the host
    tensors of the snapshot the ring evicted last (`TrainingState.spare_averaged`) where they match: a fresh host
    tensor per EMA tensor per snapshot cost twice the copy itself in page faults (a 64 MB tensor: 102 ms fresh, 35 ms
    into a reused one, on a 2-core VM). The copy is made by the training thread at keel's first call after the loop's
    update of the average, not on the snapshot ring's background path, which would need a fence before the loop's
    next update of it (the end of that call)."""
    spare, state.spare_averaged = state.spare_averaged or {}, None
    with torch.no_grad():
        return {
            name: {key: _host_copy(value, spare.get(name, {}).get(key)) for key, value in module.state_dict().items()}
            for name, module in state.averaged.items()
        }


def _host_copy(value: Any, spare: Any) -> Any:
    """``value`` copied to the host: into ``spare`` when it is a host tensor of its shape and dtype. A list of
    tensors (diffusers' ``EMAModel``'s ``shadow_params``) element by element."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
        spares = spare if isinstance(spare, list) and len(spare) == len(value) else [None] * len(value)
        return [_host_copy(v, s) for v, s in zip(value, spares, strict=True)]
    if not isinstance(value, Tensor):
        return copy.deepcopy(value)
    if (
        isinstance(spare, Tensor)
        and spare.device.type == "cpu"
        and spare.shape == value.shape
        and spare.dtype == value.dtype
        and not hasattr(value, "to_local")  # (a DTensor shard: copied as before)
    ):
        return spare.copy_(value.detach())
    return value.detach().to("cpu", copy=True)


def _load_average(average: Any, saved: dict[str, Any]) -> None:
    """Load a snapshot's copy into a model average. An ``nn.Module``'s ``load_state_dict`` copies into its own
    tensors; an average that adopts what it is given (diffusers' ``EMAModel`` takes the ``shadow_params`` list) gets
    its live tensors back, the saved values copied into them: it stays on its device, and never shares the
    snapshot's tensors (its next update would change the snapshot)."""
    if isinstance(average, nn.Module):
        average.load_state_dict(saved)
        return
    live = average.state_dict()
    merged: dict[str, Any] = {}
    with torch.no_grad():
        for name, value in saved.items():
            now = live.get(name)
            if isinstance(value, Tensor) and isinstance(now, Tensor) and now.shape == value.shape:
                merged[name] = now.copy_(value)
            elif isinstance(value, list) and isinstance(now, list) and len(now) == len(value):
                pairs = zip(now, value, strict=True)
                merged[name] = [n.copy_(v) if isinstance(n, Tensor) else copy.deepcopy(v) for n, v in pairs]
            else:
                merged[name] = copy.deepcopy(value)
    average.load_state_dict(merged)


def tensor_sources(
    state: TrainingState, *, copy_fixed: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """(parameters, buffers, optimizer skeleton) where the skeleton is the optimizer's ``state_dict`` with
    each tensor replaced by the key (``optim/<param index>/<name>``) of its entry in the parameter dict.

    Parameters and optimizer tensors change only in ``optimizer.step()``: they can be copied in the
    background during the next forward/backward. Buffers (BatchNorm statistics) change in the forward pass,
    so they are copied at once. Parameters the optimizer cannot change are left out (`keel.recover.fixed`), unless
    ``copy_fixed``.
    """
    trained, fixed, buffers = model_parts(state)
    params = {**trained, **fixed} if copy_fixed else trained
    optim = state.optimizer.state_dict()
    skeleton: dict[str, Any] = {"param_groups": plain_copy(optim["param_groups"]), "state": {}}
    for index, entry in optim["state"].items():
        skeleton["state"][index] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                name = f"optim/{index}/{key}"
                params[name] = local_tensor(value)
                skeleton["state"][index][key] = name
            else:
                skeleton["state"][index][key] = plain_copy(value)
    return params, buffers, skeleton


COMPILED = "_orig_mod."  # torch.compile's wrapper (of the model or of a submodule) names its module's tensors so


def model_key(name: str) -> str:
    """The snapshot key of the model's tensor ``name``: ``model/<name>`` without torch.compile's ``_orig_mod.``.
    A compiled model holds the same tensors under that prefix, so a run resumed with compile switched off to debug
    (or on) finds its weights; a model renamed in any other way is still another setup."""
    return "model/" + name.replace(COMPILED, "")


def without_compile_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's tensors (or fixed parameters) by `model_key`: those written before keel dropped the prefix
    carry it."""
    return {key.replace(COMPILED, "") if key.startswith("model/") else key: t for key, t in tensors.items()}


def model_parts(state: TrainingState) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The live model's tensors by snapshot key (``model/<name>``, this rank's shards), in one walk of its
    ``state_dict``: (the parameters the optimizer can change now, the fixed ones — `keel.recover.fixed` —, buffers).
    The trained ones include those the optimizer trains outside the model (`outside_parameters`)."""
    trained_now = trained_ids(state.optimizer)
    param_ids = {id(p) for p in state.model.parameters()}
    trained: dict[str, Tensor] = {}
    fixed: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    for name, t in state.model.state_dict(keep_vars=True).items():
        part = buffers if id(t) not in param_ids else trained if id(t) in trained_now else fixed
        part[model_key(name)] = local_tensor(t.detach())
    trained.update(outside_parameters(state, param_ids))
    return trained, fixed, buffers


def outside_parameters(state: TrainingState, model_ids: Collection[int] | None = None) -> dict[str, Tensor]:
    """Parameters the optimizer trains that are not the model's, by key ``optim_param/<group>/<position>``: a loss
    module's own weights beside the model (arcface's margin head ``metric_fc``, a learnable temperature). Snapshots
    hold and restore them with the model's; without, a rollback restored their momentum but not them."""
    ids = model_ids if model_ids is not None else {id(p) for p in state.model.parameters()}
    return {
        f"optim_param/{g}/{i}": local_tensor(p.detach())
        for g, group in enumerate(state.optimizer.param_groups)
        for i, p in enumerate(group["params"])
        if id(p) not in ids
    }


def fixed_parameters(state: TrainingState) -> dict[str, FixedTensor]:
    """The parameters `tensor_sources` leaves out, by key (``model/<name>``): their layout and version counter,
    and a reference to the live tensor (not a copy)."""
    return {key: FixedTensor.of(t) for key, t in model_parts(state)[1].items()}


@dataclass
class StartState:
    """What the first snapshot holds from the `Guard`'s line rather than from the first step, which is taken after that
    step's forward: the model's buffers (BatchNorm's running statistics, which that forward moved), every RNG (which
    the forward drew dropout masks from) and the data position of each object tracked before the first step (which
    had handed out the first batch). A resume from that snapshot then redoes step 0 as the run did it: resumed, the
    first step's loss differed in the 4th digit, and every later step with it (h28 R5). Kept only while no parameter
    was written since (a checkpoint loaded after the Guard's line brings a start of its own: then the state is taken
    as it is at the first step, one forward on)."""

    buffers: dict[str, Tensor]
    versions: list[int]
    rng: dict[str, Any]
    tracked: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, state: TrainingState) -> StartState:
        """The buffers (copies), the parameters' versions and the RNG states now."""
        trained, fixed, buffers = model_parts(state)
        return cls({k: b.clone() for k, b in buffers.items()}, _versions({**trained, **fixed}), capture_rng())

    def track(self, name: str, obj: Stateful) -> None:
        """``obj``'s state now: the data position before the first batch."""
        self.tracked[name] = plain_copy(obj.state_dict())

    def still_the_start(self, state: TrainingState) -> StartState | None:
        """This start, if no parameter was written since it was held (else None)."""
        trained, fixed, _ = model_parts(state)
        return self if _versions({**trained, **fixed}) == self.versions else None


def _versions(tensors: dict[str, Tensor]) -> list[int]:
    return [getattr(t, "_version", -1) for t in tensors.values()]


def model_tensors(state: TrainingState) -> dict[str, Tensor]:
    """The live model's parameters and buffers by snapshot key (``model/<name>``), this rank's shards."""
    trained, fixed, buffers = model_parts(state)
    return {**trained, **fixed, **buffers}


def trained_keys(state: TrainingState) -> set[str]:
    """Keys of the parameters the optimizer can change now."""
    return set(model_parts(state)[0])


def capture_plain(state: TrainingState) -> dict[str, Any]:
    """Deep copies of the small states, and every RNG the training loop may draw from."""
    plain: dict[str, Any] = {
        "scheduler": plain_copy(state.scheduler.state_dict()) if state.scheduler is not None else None,
        "scaler": plain_copy(state.scaler.state_dict()) if state.scaler is not None else None,
        "components": plain_states(state.components),
        "history": plain_states(state.history),
        "tracked": plain_states(state.tracked),
        "classes": classes_of(state),
        "rng": capture_rng(),
    }
    modes = object_modes(state.optimizer)
    if modes is not None:  # (only a schedule-free wrapper has one: other snapshots stay as they were)
        plain["optimizer_modes"] = modes
    return plain


def capture_rng() -> dict[str, Any]:
    """Every RNG the training loop may draw from (Python's, NumPy's global, torch's CPU and CUDA generators)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


_ATOMS = frozenset({float, int, str, bool, type(None)})  # immutable: shared by a copy as deepcopy shares them


def plain_states(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    """Each part's ``state_dict()`` as a plain copy (`plain_copy`), by its key."""
    return {key: plain_copy(part.state_dict()) for key, part in parts.items()}


def load_states(parts: Mapping[str, Stateful], states: Mapping[str, Any]) -> None:
    """Load into each part the state kept under its key, as a deep copy (``states`` stays as it was: a snapshot is
    restored more than once); a part with no state kept is left as it is."""
    for key, part in parts.items():
        if key in states:
            part.load_state_dict(copy.deepcopy(states[key]))


def plain_copy(value: Any) -> Any:
    """A deep copy of a state made of dicts, lists and tuples of numbers and strings, as ``copy.deepcopy`` makes it
    but without its per-element bookkeeping: a detector keeps lists of hundreds of floats (the divergence detector's
    window), and ``deepcopy`` of them was most of a snapshot's time on a small model. Anything else (a tensor, an
    array, a subclass of dict or list, an object) goes through ``copy.deepcopy``. A list held twice is copied twice
    (not kept as one, as ``deepcopy`` would): snapshots are only read, and restored through ``deepcopy``.

    Example:
        >>> state = {"window": [1.0, 2.0], "best": (0.5, 3)}
        >>> copied = plain_copy(state)
        >>> copied == state and copied["window"] is not state["window"]
        True
    """
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is list:
        return value.copy() if set(map(type, value)) <= _ATOMS else [plain_copy(v) for v in value]
    if kind is dict:
        return {k: plain_copy(v) for k, v in value.items()}  # (keys are hashable: immutable, shared as by deepcopy)
    if kind is tuple:
        return value if set(map(type, value)) <= _ATOMS else tuple(plain_copy(v) for v in value)
    return copy.deepcopy(value)


def restore(
    state: TrainingState,
    tensors: dict[str, Tensor],
    skeleton: dict[str, Any],
    plain: dict[str, Any],
    *,
    resume: bool,
    fixed: Collection[str] = (),
) -> None:
    """Write a snapshot back into the live objects, keeping every Parameter object (optimizers and hooks
    that hold references stay valid).

    Args:
        resume: True when continuing a run whose process ended: the run's history and the tracked data
            position are restored too. False for a rollback: both stay where they are (the ladder keeps
            counting, and training moves on to fresh data).
        fixed: Keys of the parameters the snapshot left out (`keel.recover.fixed`): they stay as they are. Any
            other model tensor missing from ``tensors`` is a ``KeyError``.
    """
    with torch.no_grad():
        for name, t in state.model.state_dict(keep_vars=True).items():
            key = model_key(name)
            if key not in tensors and key in fixed:
                continue
            local_tensor(t).copy_(tensors[key])
        for key, t in outside_parameters(state).items():
            if key in tensors:  # (a snapshot written before keel held them has none)
                t.copy_(tensors[key])
    optim_state = {
        "param_groups": copy.deepcopy(skeleton["param_groups"]),
        "state": {
            index: {
                k: tensors[v].clone() if isinstance(v, str) and v.startswith("optim/") else copy.deepcopy(v)
                for k, v in entry.items()
            }
            for index, entry in skeleton["state"].items()
        },
    }
    state.optimizer.load_state_dict(optim_state)
    set_object_modes(state.optimizer, plain.get("optimizer_modes"))
    _reshard_optimizer_state(state.optimizer)
    if state.scheduler is not None and plain["scheduler"] is not None:
        state.scheduler.load_state_dict(copy.deepcopy(plain["scheduler"]))
    if state.scaler is not None and plain["scaler"] is not None:
        state.scaler.load_state_dict(copy.deepcopy(plain["scaler"]))
    load_states(state.components, plain["components"])
    for key, average in state.averaged.items():
        if key in plain.get("averaged", {}):
            _load_average(average, plain["averaged"][key])
    if resume:
        load_states(state.history, plain["history"])
        load_states(state.tracked, plain["tracked"])
    rng = plain["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def classes_of(state: TrainingState) -> dict[str, str | None]:
    """The optimizer, scheduler and scaler classes as ``module.QualName`` (None where there is none): stored with
    each snapshot, so a resume can tell another setup from the one the run was started with. A `keel.Optimizers`
    (or `keel.Schedulers`) is named with its parts in order, ``keel.guard.optimizers.Optimizers(torch.optim.muon.Muon,
    torch.optim.adamw.AdamW)``: its state_dict numbers the parameters on across the parts, so parts in another order
    or of another class load each other's state and the first step fails deep inside torch (``KeyError: 'step'``)."""
    return {
        role: None if obj is None else _class_name(obj)
        for role, obj in (("optimizer", state.optimizer), ("scheduler", state.scheduler), ("scaler", state.scaler))
    }


def _class_name(obj: Any) -> str:
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    parts = getattr(obj, "optimizers", None) or getattr(obj, "schedulers", None)
    if type(obj).__module__ == "keel.guard.optimizers" and isinstance(parts, tuple):
        return f"{name}({', '.join(_class_name(part) for part in parts)})"
    return name


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (FSDP2 parameters and their optimizer state); other tensors as they are.

    Snapshots hold each rank's own shard, so a sharded run snapshots and restores without communication.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` from local shards, make each state tensor of a sharded (``DTensor``) parameter a
    ``DTensor`` again, sharded like its parameter (the optimizer's next step mixes them)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not hasattr(p, "device_mesh"):
                continue
            from torch.distributed.tensor import DTensor

            local_shape = p.to_local().shape
            entry = optimizer.state.get(p, {})
            for key, value in entry.items():
                if (
                    isinstance(value, Tensor)
                    and not isinstance(value, DTensor)
                    and value.dim() > 0
                    and value.shape == local_shape
                ):
                    entry[key] = DTensor.from_local(
                        value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                    )


def reseed(base: int) -> None:
    """Move every RNG to a fresh, reproducible stream (after a rollback, so dropout masks and data drawn
    from the global RNG do not replay the window that went wrong)."""
    random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)
