"""Whether a snapshot fits the live training objects, checked before a resume writes anything into them.

A resume into another setup used to be accepted and to fail later, deep inside torch: another optimizer class
crashed its first step (``KeyError: 'momentum'``), a wider model gave a raw size-mismatch ``RuntimeError``, other
parameter names a ``KeyError``. `setup_differences` compares what a snapshot records — its model tensors (names,
shapes, dtypes), the optimizer's parameter groups, and the optimizer and scheduler classes (`classes_of`, stored
with every snapshot) — with the live objects, and says each difference in words.
"""

from __future__ import annotations

from torch import Tensor

from keel.recover.fixed import placeholders
from keel.recover.snapshot import Snapshot
from keel.recover.state import TrainingState, classes_of, local_tensor, model_key

MAX_SHOWN = 5  # differences named in one error; the rest are counted
MAX_NAMES = 6  # parameter names listed in one difference
_GROUPS = ("keel.guard.optimizers.Optimizers", "keel.guard.optimizers.Schedulers")  # named with their parts since h30


def setup_differences(snap: Snapshot, state: TrainingState) -> list[str]:
    """How the setup the snapshot was taken with differs from ``state``'s; empty when it fits."""
    differences = _model_differences({**snap.tensors, **placeholders(snap.fixed)}, state)  # fixed: layout only
    saved = snap.plain.get("classes")
    now = classes_of(state)
    if isinstance(saved, dict):  # snapshots from before keel recorded the classes have none to compare
        for role in ("optimizer", "scheduler"):
            if not _same_class(saved.get(role), now[role]):
                differences.append(f"{role}: {saved.get(role) or 'none'} in the snapshot, {now[role] or 'none'} now")
    saved_groups = [len(g["params"]) for g in snap.skeleton["param_groups"]]
    groups = [len(g["params"]) for g in state.optimizer.param_groups]
    if saved_groups != groups:
        differences.append(f"optimizer parameter groups: sizes {saved_groups} in the snapshot, {groups} now")
    return differences


def _same_class(saved: object, now: str | None) -> bool:
    """Whether the class a snapshot records is ``now``'s; one written before keel named a `keel.Optimizers`' parts
    (``…Optimizers`` alone) fits any parts."""
    if saved == now:
        return True
    return saved in _GROUPS and now is not None and now.startswith(f"{saved}(")


def describe_differences(differences: list[str]) -> str:
    """The first `MAX_SHOWN` differences, then how many more."""
    shown = "; ".join(differences[:MAX_SHOWN])
    rest = len(differences) - MAX_SHOWN
    return shown + (f"; … and {rest} more" if rest > 0 else "")


def _model_differences(tensors: dict[str, Tensor], state: TrainingState) -> list[str]:
    saved = {k.removeprefix("model/"): t for k, t in tensors.items() if k.startswith("model/")}
    live = {
        model_key(k).removeprefix("model/"): local_tensor(t) for k, t in state.model.state_dict(keep_vars=True).items()
    }
    differences = []
    for names, where in (
        (sorted(saved.keys() - live.keys()), "in the snapshot, not in the model"),
        (sorted(live.keys() - saved.keys()), "in the model, not in the snapshot"),
    ):
        if names:
            listed = ", ".join(names[:MAX_NAMES]) + (f", … ({len(names)} in all)" if len(names) > MAX_NAMES else "")
            differences.append(f"model: {where}: {listed}")
    for name in sorted(saved.keys() & live.keys()):
        a, b = saved[name], live[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            differences.append(f"model {name}: shape {_layout(a)} in the snapshot, {_layout(b)} now")
    return differences


def _layout(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
