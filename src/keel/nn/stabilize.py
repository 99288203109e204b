"""`stabilize`: apply stabilizers from the literature to an existing model in one call.

Surgery in the manner of Composer's ``replace_module_classes``: match structurally, keep Parameters,
update the optimizer's groups, warn when nothing matched.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from keel.nn._param_groups import add_new_parameters
from keel.nn._record import remember
from keel.nn.stabilizers import Change, Stabilizer, StabilizerNoEffectWarning
from keel.nn.stabilizers import stabilizers as _registry
from keel.nn.z_loss_hook import ZLossHook

DEFAULT_STABILIZERS = ("qk_norm", "z_loss")


def list_stabilizers() -> list[tuple[str, str, str]]:
    """(name, one-line description, reference) of every stabilizer `stabilize` knows, sorted by name."""
    # Every stabilizer is registered as its class, which carries the description and reference (class variables).
    classes = [(name, cast("type[Stabilizer]", _registry.get(name))) for name in _registry.names()]
    return [(name, cls.description, cls.reference) for name, cls in classes]


def create_stabilizer(name: str, **options: Any) -> Stabilizer:
    """A stabilizer by name with non-default options, e.g. ``create_stabilizer("qk_norm", norm="rms")``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a bad option value.
    """
    return _registry.create(name, **options)


@dataclass
class StabilizeResult:
    """What `stabilize` changed.

    Attributes:
        changes: Every change, in the order made.
        unmatched: Names of requested stabilizers that matched nothing.
    """

    changes: list[Change] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def replaced(self) -> dict[str, nn.Module]:
        """Qualified module name → the module now there, for every module a stabilizer touched."""
        return {c.name: c.new for c in self.changes}

    @property
    def new_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.changes for p in c.new_parameters]

    @property
    def z_loss_hooks(self) -> list[ZLossHook]:
        return [c.extra for c in self.changes if isinstance(c.extra, ZLossHook)]

    def by_stabilizer(self) -> dict[str, list[str]]:
        """Stabilizer name → names of the modules it changed."""
        out: dict[str, list[str]] = {}
        for c in self.changes:
            out.setdefault(c.stabilizer, []).append(c.name)
        return out

    def z_loss(self, mask: Tensor | None = None) -> Tensor:
        """The z-loss of the latest forward, to add to the task loss (0 when the stabilizer was not applied)."""
        hooks = self.z_loss_hooks
        if not hooks:
            return torch.zeros(())
        total = hooks[0].loss(mask)
        for hook in hooks[1:]:
            total = total + hook.loss(mask)
        return total


def stabilize(
    model: nn.Module,
    stabilizers: Sequence[str | Stabilizer] = DEFAULT_STABILIZERS,
    optimizer: Optimizer | None = None,
) -> StabilizeResult:
    """Apply stabilizers to ``model`` in place; returns what changed.

    Use it on a model that already exists (your own, nanoGPT, Hugging Face GPT-2/Llama,
    ``nn.MultiheadAttention`` stacks, keel's proxy) instead of editing its code. Stabilizers match
    structurally (see each stabilizer's docstring, or `list_stabilizers`), run in a fixed order (qk_norm,
    sigma_reparam, z_loss, scale_long) whatever the order given, keep existing Parameters (optimizer
    state survives) and are idempotent: applying one twice changes nothing the second time.

    With ``optimizer``, every new parameter joins the optimizer, next to the parameter it belongs with:
    matrices (a calibration MLP's weights) in that parameter's group; 1-D and scalar ones (QK-norm gains
    and biases, σReparam's γ) without weight decay, as nanoGPT, Hugging Face and timm treat 1-D
    parameters — in that group when it does not decay, else in a group with its hyper-parameters and
    ``weight_decay=0`` (nanoGPT's own no-decay group; one is added when none matches). Call it before
    building an LR scheduler or a `Guard`: with a scheduler already built no group is added (torch's
    schedulers would raise), the gains decay with their neighbours and a `NoDecayGroupWarning` says so.
    Without an optimizer, add ``result.new_parameters`` yourself. The z-loss acts through the loss: add
    ``result.z_loss()`` to your loss after each forward.

    New LayerNorms and Linears follow the model's bias convention (none in a model built with
    ``bias=False``). To resume or sample from a checkpoint, re-apply the same stabilizers before loading it:
    save `stabilize_record` next to the state dict and load with `load_stabilized`.

    Args:
        model: The model, changed in place.
        stabilizers: Stabilizer names (default ``("qk_norm", "z_loss")``, Wortsman et al.'s pair) or configured
            stabilizers from `create_stabilizer`.
        optimizer: An optimizer over ``model``'s parameters to update.

    Returns:
        A `StabilizeResult`; ``result.replaced`` maps module names to the modules now there.

    Warns:
        StabilizerNoEffectWarning: once per call, naming the stabilizers that matched nothing.
        NoDecayGroupWarning: once per call, when an LR scheduler kept the new gains out of a no-decay group.

    Raises:
        ValueError: unknown stabilizer name or the same stabilizer twice.

    Example:
        >>> block = nn.TransformerEncoderLayer(16, 4, batch_first=True)
        >>> opt = torch.optim.AdamW(block.parameters())
        >>> result = stabilize(block, ["qk_norm", "sigma_reparam"], optimizer=opt)
        >>> sorted(result.by_stabilizer())
        ['qk_norm', 'sigma_reparam']

    References:
        Composer ``utils/module_surgery.py`` (``replace_module_classes``) for the surgery pattern; each
        stabilizer cites its paper.
    """
    if isinstance(stabilizers, str):
        raise ValueError(f"stabilizers={stabilizers!r}; allowed: a list of names, e.g. [{stabilizers!r}]")
    resolved = [_registry.create(r) if isinstance(r, str) else r for r in stabilizers]
    names = [r.name for r in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"stabilizers={names!r} repeat {duplicates}; allowed: each stabilizer once")
    result = StabilizeResult()
    for stabilizer in sorted(resolved, key=lambda r: r.order):
        changes = stabilizer.apply(model)
        if changes:
            remember(model, stabilizer)
        else:
            result.unmatched.append(stabilizer.name)
        result.changes.extend(changes)
    if optimizer is not None:
        add_new_parameters(optimizer, model, result.changes)
    if result.unmatched:
        warnings.warn(
            StabilizerNoEffectWarning(
                f"stabilize: {', '.join(result.unmatched)} matched nothing in {type(model).__name__} (or was "
                "already applied); see keel.nn.list_stabilizers() and each stabilizer's docstring for what it "
                "recognises"
            ),
            stacklevel=2,
        )
    return result
