"""Private helpers the MoE stabilizers share: where a model's routers are, and what a router's output holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

# The names a router goes by: Hugging Face Mixtral / Qwen-MoE / OLMoE and keel's proxy (gate), others (router).
ROUTER_NAMES = ("gate", "router")
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "k")


@dataclass(frozen=True)
class RouterSite:
    """One router: its qualified name, the module, its MoE block (the parent) and its top-k when declared."""

    name: str
    module: nn.Module
    block: nn.Module | None
    top_k: int | None


def _int_attr(module: nn.Module | None, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def is_router(module: nn.Module, parent: nn.Module | None) -> bool:
    """A router by layout: a 2-D ``weight`` (E ≥ 2, d) beside an ``experts`` child (the rule of
    `keel.signals.router`'s probe: Qwen2-MoE's (1, d) ``shared_expert_gate`` scales, it routes nothing)."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[0] >= 2
        and parent is not None
        and isinstance(getattr(parent, "experts", None), nn.Module)
    )


def find_routers(model: nn.Module, names: list[str] | None, owner: str) -> list[RouterSite]:
    """The routers of ``model``: the named modules, else those found by layout, in registration order.

    Raises:
        ValueError: a name in ``names`` is not a submodule of the model (``owner`` names the option).
    """
    table = dict(model.named_modules())

    def parent_of(name: str) -> nn.Module | None:
        return table.get(name.rpartition(".")[0]) if name else None

    if names is not None:
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(f"{owner}={names!r}: {missing[0]!r} is not a submodule; allowed: names of router modules")
        found = [(n, table[n]) for n in names]
    else:
        found = [
            (n, m) for n, m in table.items() if n.rpartition(".")[2] in ROUTER_NAMES and is_router(m, parent_of(n))
        ]
    sites = []
    for name, module in found:
        block = parent_of(name)
        top_k = _int_attr(module, TOP_K_ATTRS) or _int_attr(block, TOP_K_ATTRS)
        sites.append(RouterSite(name=name, module=module, block=block, top_k=top_k))
    return sites


def split_output(output: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(logits, routing weights or None, chosen experts or None) of a router's output.

    A tensor is the logits (Mixtral 4.x's ``nn.Linear`` gate); a tuple is ``(logits, weights, indices)`` as Hugging
    Face 5.x ``*TopKRouter`` and keel's proxy router return.
    """
    if isinstance(output, Tensor):
        return output, None, None
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        weights = output[1] if len(output) > 1 and isinstance(output[1], Tensor) else None
        chosen = output[2] if len(output) > 2 and isinstance(output[2], Tensor) else None
        if chosen is not None and chosen.is_floating_point():
            chosen = None
        return output[0], weights, chosen
    raise TypeError(f"router output {type(output).__name__}; allowed: logits, or a tuple (logits, weights, indices)")


def hooks_of(module: nn.Module, kind: type) -> list[Any]:
    """The forward hooks of ``kind`` already on ``module`` (a stabilizer applied twice changes nothing)."""
    return [h for h in module._forward_hooks.values() if isinstance(h, kind)]
