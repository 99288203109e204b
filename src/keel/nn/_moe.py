"""Private helpers the MoE stabilizers share: their routers (found by `keel.losses._router_layout`'s rule, or named)
and the hooks already on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from keel.losses._router_layout import declared_top_k, parent_module, routers_by_layout, routers_with_classifiers


@dataclass(frozen=True)
class RouterSite:
    """One router: its qualified name, the module, its MoE block (the parent) and its top-k when declared."""

    name: str
    module: nn.Module
    block: nn.Module | None
    top_k: int | None


def find_routers(
    model: nn.Module, names: list[str] | None, owner: str, *, classifiers: bool = False
) -> list[RouterSite]:
    """The routers of ``model``: the named modules, else those found by layout, in registration order.

    ``classifiers=True`` also finds the logit layers of Switch Transformers / NLLB-MoE routers
    (`keel.losses._router_layout.classifier_routers`): what a loss on the logits needs. Their parent is the router,
    not the MoE block, so the stabilizers that change a block's or a router's output leave them out.

    Raises:
        ValueError: a name in ``names`` is not a submodule of the model (``owner`` names the option).
    """
    table = dict(model.named_modules())
    found: list[tuple[str, nn.Module, int | None]]
    if names is not None:
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(f"{owner}={names!r}: {missing[0]!r} is not a submodule; allowed: names of router modules")
        found = [(n, table[n], None) for n in names]
    elif classifiers:
        found = routers_with_classifiers(model)
    else:
        found = [(n, m, None) for n, m in routers_by_layout(model)]
    sites = []
    for name, module, layout_top_k in found:
        block = parent_module(table, name)
        top_k = layout_top_k or declared_top_k(module, block)
        sites.append(RouterSite(name=name, module=module, block=block, top_k=top_k))
    return sites


def hooks_of(module: nn.Module, kind: type) -> list[Any]:
    """The forward hooks of ``kind`` already on ``module`` (a stabilizer applied twice changes nothing)."""
    return [h for h in module._forward_hooks.values() if isinstance(h, kind)]
