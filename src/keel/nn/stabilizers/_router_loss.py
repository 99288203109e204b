"""Private: how the ``router_z_loss`` and ``load_balancing`` stabilizers put their hooks on a model's routers."""

from __future__ import annotations

from torch import nn

from keel.nn._moe import find_routers, hooks_of
from keel.nn.router_aux_loss import RouterAuxLossHook
from keel.nn.stabilizers._base import Change


def attach_router_loss(
    model: nn.Module, *, stabilizer: str, kind: str, coefficient: float, routers: list[str] | None, top_k: int | None
) -> list[Change]:
    """Put a `RouterAuxLossHook` of ``kind`` on every router of ``model`` (one `Change` each); a router that has
    one of that kind already is reported, not hooked twice."""
    changes = []
    for site in find_routers(model, routers, f"{stabilizer}.routers", classifiers=True):
        present = [h for h in hooks_of(site.module, RouterAuxLossHook) if h.kind == kind]
        if present:
            changes.append(
                Change(
                    stabilizer=stabilizer,
                    name=site.name,
                    old=site.module,
                    new=site.module,
                    extra=present[0],
                    how=f"{kind} hook already attached",
                )
            )
            continue
        hook = RouterAuxLossHook(kind, coefficient, top_k=top_k or site.top_k or 1)
        changes.append(
            Change(
                stabilizer=stabilizer,
                name=site.name,
                old=site.module,
                new=site.module,
                handles=(hook.attach(site.module),),
                extra=hook,
                how=f"forward hook injects the gradient of {coefficient:g}·{kind} in backward (the loss is untouched)",
            )
        )
    return changes


def check_router_options(owner: str, routers: object, top_k: object) -> None:
    """Raise ValueError naming the option unless ``routers`` is None or a list of names and ``top_k`` None or an
    int >= 1."""
    if routers is not None and not (
        isinstance(routers, list | tuple) and routers and all(isinstance(r, str) for r in routers)
    ):
        raise ValueError(f"{owner}.routers={routers!r}; allowed: None or a non-empty list of module names")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise ValueError(f"{owner}.top_k={top_k!r}; allowed: None or an int >= 1")
