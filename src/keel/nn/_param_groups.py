"""Where `keel.stabilize` puts the parameters it creates in an existing optimizer's groups.

The convention of nanoGPT (``configure_optimizers``), Hugging Face (``get_decay_parameter_names``) and timm
(``param_groups_weight_decay``): matrices decay, 1-D parameters — norm gains, biases, scalar gains — do not.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from keel.nn.stabilizers import Change, NoDecayGroupWarning

# The group keys that hold a decay strength: torch's optimizers, and keel's IndependentAdamW (whose
# ``weight_decay`` stays 0). Flags such as Adam's ``decoupled_weight_decay`` are not strengths.
DECAY_KEYS = ("weight_decay", "independent_weight_decay")
# The marker torch's LRScheduler leaves on the ``optimizer.step`` it wraps when it is built (``_with_counter``
# before torch 2.0). A scheduler zips its per-group lists with the optimizer's groups strictly on every step,
# so a group added after it makes scheduler.step() raise. (``initial_lr`` in a group is no sign of one:
# keel's IndependentAdamW sets it itself.)
SCHEDULER_MARKS = ("_wrapped_by_lr_sched", "_with_counter")
# Per-group keys that are bookkeeping, not hyper-parameters.
NOT_HYPER = ("params", "param_names")


def add_new_parameters(optimizer: Optimizer, model: nn.Module, changes: list[Change]) -> None:
    """Add each change's new trainable parameters to ``optimizer``.

    A matrix joins the group of the parameter it sits next to (``change.anchor``; the first group when there
    is none). A 1-D or scalar parameter joins a group with that group's hyper-parameters and no weight decay:
    the group itself when it has none, else an existing group that matches, else a new one — unless an LR
    scheduler is already built over the optimizer, in which case it joins the anchor's group and one
    `NoDecayGroupWarning` says so.
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    kept_decay: list[tuple[int, dict[str, Any]]] = []
    for change in changes:
        fresh = [p for p in change.new_parameters if p.requires_grad and id(p) not in known]
        if not fresh:
            continue
        known.update(id(p) for p in fresh)
        home = _group_of(optimizer, change.anchor)
        _extend(home, [p for p in fresh if p.dim() >= 2], names)
        flat = [p for p in fresh if p.dim() < 2]
        if not flat:
            continue
        twin = _no_decay_twin(optimizer, home)
        if twin is None:
            _extend(home, flat, names)
            kept_decay.append((len(flat), home))
        elif any(g is twin for g in optimizer.param_groups):
            _extend(twin, flat, names)
        else:  # add_param_group, not a list append: the optimizer (or a wrapper like OrthoGrad) checks it
            labels = {"param_names": [names.get(id(p), "") for p in flat]} if "param_names" in home else {}
            optimizer.add_param_group({**twin, "params": flat, **labels})
    if kept_decay:
        count = sum(n for n, _ in kept_decay)
        decay = {k: v for _, g in kept_decay for k, v in g.items() if k in DECAY_KEYS}
        warnings.warn(
            NoDecayGroupWarning(
                f"stabilize: {count} new 1-D parameters (norm gains/biases, σReparam's γ) joined their neighbours' "
                f"parameter group with {', '.join(f'{k}={v}' for k, v in decay.items())}: a no-decay group "
                "added now would break the LR scheduler already built over the optimizer; call keel.stabilize "
                "before building the LR scheduler (and the Guard)"
            ),
            stacklevel=3,
        )


def _group_of(optimizer: Optimizer, anchor: Tensor | None) -> dict[str, Any]:
    if anchor is not None:
        for group in optimizer.param_groups:
            if any(p is anchor for p in group["params"]):
                return group
    return optimizer.param_groups[0]


def _extend(group: dict[str, Any], params: list[nn.Parameter], names: dict[int, str]) -> None:
    group["params"].extend(params)
    if "param_names" in group:  # torch keeps names and params of a group in step
        group["param_names"].extend(names.get(id(p), "") for p in params)


def _no_decay_twin(optimizer: Optimizer, home: dict[str, Any]) -> dict[str, Any] | None:
    """``home`` itself if it does not decay; else a group like it without decay (an existing one, or a new dict
    not yet in the optimizer); None when a new group would break an LR scheduler already built."""
    decay = [k for k in DECAY_KEYS if k in home and _nonzero(home[k])]
    if not decay:
        return home
    wanted = {k: v for k, v in home.items() if k not in NOT_HYPER} | dict.fromkeys(decay, 0.0)
    for group in optimizer.param_groups:
        if _same_hyper(group, wanted):
            return group
    if _scheduler_built(optimizer):
        return None
    return wanted


def _scheduler_built(optimizer: Optimizer) -> bool:
    wrapped = getattr(optimizer, "optimizer", None)  # a wrapper (OrthoGrad): the scheduler may drive either
    steps = [getattr(o, "step", None) for o in (optimizer, wrapped) if o is not None]
    return any(hasattr(step, mark) for step in steps for mark in SCHEDULER_MARKS)


def _nonzero(value: Any) -> bool:
    try:
        return float(value) != 0.0
    except (TypeError, ValueError):
        return True  # a strength keel cannot read: treat it as decaying, so the new gains are kept out of it


def _same_hyper(group: dict[str, Any], wanted: dict[str, Any]) -> bool:
    hyper = {k: v for k, v in group.items() if k not in NOT_HYPER}
    return hyper.keys() == wanted.keys() and all(_same(hyper[k], wanted[k]) for k in hyper)


def _same(a: Any, b: Any) -> bool:
    """Equality for group values, which may be tensors (a tensor LR) or tuples of them (betas)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False
