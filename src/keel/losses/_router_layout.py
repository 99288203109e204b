"""Where a model's mixture-of-experts routers are, and what a router's output holds: the one rule the router probe
(`keel.signals.router`) and the MoE stabilizers (`keel.nn`) share, kept here beside the router losses because both
of those layers may import this one.

A router, by layout: a module named ``gate`` or ``router`` with a 2-D ``weight`` (E ≥ 2, d) whose parent has an
``experts`` child — Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE ``mlp.gate``, Mixtral 4.x's
``block_sparse_moe.gate``, keel's proxy MoE router. Qwen2-MoE's (1, d) ``shared_expert_gate`` scales, it routes
nothing. Hugging Face Switch Transformers and NLLB-MoE keep the logits in the ``classifier`` child of a weightless
``router`` (`classifier_routers`).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

ROUTER_NAMES = ("gate", "router")
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "k")


def declared_top_k(module: nn.Module | None, block: nn.Module | None) -> int | None:
    """The router's top-k as the module, else its MoE block, declares it (``top_k``, ``num_experts_per_tok``,
    ``k``), or None."""
    for owner in (module, block):
        for name in TOP_K_ATTRS:
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
    return None


def is_router(module: nn.Module, parent: nn.Module | None) -> bool:
    """A router by layout: a 2-D ``weight`` (E ≥ 2, d) beside an ``experts`` child."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[0] >= 2
        and parent is not None
        and isinstance(getattr(parent, "experts", None), nn.Module)
    )


def parent_module(table: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The parent of the submodule ``name`` in ``table`` (``dict(model.named_modules())``); None for the root."""
    return table.get(name.rpartition(".")[0]) if name else None


def routers_by_layout(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The routers of ``model`` found by layout, in registration order.

    Example:
        >>> routers_by_layout(nn.Linear(2, 2))
        []
    """
    table = dict(model.named_modules())
    return [
        (n, m)
        for n, m in table.items()
        if n.rpartition(".")[2] in ROUTER_NAMES and is_router(m, parent_module(table, n))
    ]


_TOP_K_IN_CLASS_NAME = re.compile(r"Top(\d+)Router$")  # SwitchTransformersTop1Router, NllbMoeTop2Router


def classifier_routers(model: nn.Module) -> list[tuple[str, nn.Module, int | None]]:
    """The logit layers of T5X / fairseq-style routers, with their top-k, in registration order.

    Hugging Face Switch Transformers and NLLB-MoE route through a ``router`` (beside ``experts``) that holds no
    weight itself: its ``classifier`` child (``nn.Linear(d, E)``) makes the raw logits and the router returns
    ``(dispatch mask, probabilities, logits)``. The classifier is the module to watch; k is the router's declared
    ``top_k`` / ``num_experts_per_tok``, else the N of its class name ``...TopNRouter``, else None.

    Example:
        >>> classifier_routers(nn.Linear(2, 2))
        []
    """
    table = dict(model.named_modules())
    found = []
    for name, module in table.items():
        router_name, _, leaf = name.rpartition(".")
        router = table.get(router_name) if router_name else None
        if leaf != "classifier" or router is None or router_name.rpartition(".")[2] not in ROUTER_NAMES:
            continue
        block = parent_module(table, router_name)
        if is_router(router, block) or not is_router(module, block):
            continue  # a router with its own weight is found by layout; the classifier needs the block's experts
        match = _TOP_K_IN_CLASS_NAME.search(type(router).__name__)
        top_k = declared_top_k(router, block) or (int(match[1]) if match else None)
        found.append((name, module, top_k))
    return found


def routers_with_classifiers(model: nn.Module) -> list[tuple[str, nn.Module, int | None]]:
    """Every router of ``model`` with its top-k where the layout gives it: `routers_by_layout` (top-k None: the
    module or its block declares it, `declared_top_k`) and `classifier_routers`, in registration order.

    Example:
        >>> routers_with_classifiers(nn.Linear(2, 2))
        []
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    found = [(n, m, None) for n, m in routers_by_layout(model)] + classifier_routers(model)
    return sorted(found, key=lambda entry: order[entry[0]])


def split_router_output(output: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(logits, routing weights or None, chosen experts or None) of a router's output.

    A tensor is the logits (Mixtral 4.x's ``nn.Linear`` gate); a tuple is ``(logits, weights, indices)`` as Hugging
    Face 5.x ``*TopKRouter`` and keel's proxy router return (indices of a floating dtype are not indices).
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
