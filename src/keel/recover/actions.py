"""Actions applied after a rollback, chosen by what the diagnosis says went wrong.

| action             | what it does                                         | when                                     |
|--------------------|------------------------------------------------------|------------------------------------------|
| `lr_backoff`       | scales each group's LR by `lr_backoff` (compounding) | model-caused trouble, repeated rollbacks |
|                    | — or only a router group's LR above the rest's       | a router's trouble alone (see below)     |
| `reset_moments`    | clears the optimizer state (Adam moments from 0)     | non-finite parameters an update made     |
| `tighten_clipping` | clips the gradient norm at 2× its healthy baseline   | gradient-norm spikes                     |

Sources: `lr_backoff`, the OPT-175B logbook (the LR was lowered after loss explosions); `reset_moments`, SPAM
(Huang et al. 2025: momentum reset after spikes); `tighten_clipping`, OPT-175B (clipping 2.5 → 1.0) and
Stable-SPAM's AdaClip.

Non-finite parameters back the LR off when an update made them: the steps before were already in trouble (a
warning open, a skip or critical finding within ``quiet_steps``, or a rollback not yet followed by an update) — an
overflow from a too-high LR builds up through spikes first. When the steps before were healthy updates, the
NaN/Inf was written between steps (the user's code, a bit flip): the snapshot restored predates it, moments
included, so the rollback alone mends it and the LR and moments are left as they were. A repeat within the
escalation window backs off whatever the steps before looked like.

A rollback for a router alone — every critical finding a router's (``load_collapse``, ``router_logit_growth``,
``dead_experts``) — cuts only the LR of the optimizer's param groups that hold router parameters alone when their LR
is above every other group's (`router_param_groups`, `router_lr_cuts`): the router's LR is the odd one out, and
cutting the whole model's slows everything else for nothing. Each such cut is ``lr_backoff``, or down to the highest
other LR when that is lower; a router no longer above the rest and in trouble again gets the whole model's cut, as
does a router sharing its group. Measured on tiny Hugging Face Mixtral / Qwen3-MoE (/work/notes/h26-D-figures.md):
with the router's group at 100× the LR, the whole model's cuts ended the runs at loss 3.83 / 4.30 where the runs
left alone ended at 2.38 / 2.28; the router's cut, 2.40 / 2.33. With a whole-model LR of 0.1, which locks the same
router, the whole model's cut mended it (2.88 → 2.37) and a router-only cut did not (2.87).

The LR scale is applied around ``optimizer.step()`` only, so a scheduler (chainable or not) never sees it.
With ``cooldown_steps`` it ramps linearly back to 1 over that many steps; by default it stays, as OPT-175B's
lowered LR did, because a recipe that diverged once at an LR tends to diverge again there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from keel._core import keys
from keel._core.finding import Finding
from keel.signals.router import find_routers

MODEL_CAUSED_KINDS = frozenset({"divergence", "non_finite"})
# Findings about a mixture-of-experts router itself: a rollback for these alone backs off the router's LR only.
ROUTER_KINDS = frozenset({"load_collapse", "router_logit_growth", "dead_experts"})
HISTORY_KEY = "actions"  # `ActionState`'s key in `TrainingState.history`, and so in every snapshot
# Disk snapshots written before keel called these "actions" hold the same state under this key.
LEGACY_HISTORY_KEY = "remedy"


@dataclass
class ActionState:
    """What the actions have changed so far; part of the run's history in every snapshot."""

    lr_scale: float = 1.0
    lr_scale_since: int = 0  # step the current scale was set (for the cool-down ramp)
    max_grad_norm: float | None = None
    group_lr_scale: dict[int, float] = field(default_factory=dict)  # param group → its own scale (router groups)

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr_scale": self.lr_scale,
            "lr_scale_since": self.lr_scale_since,
            "max_grad_norm": self.max_grad_norm,
            "group_lr_scale": [[i, s] for i, s in sorted(self.group_lr_scale.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale, self.lr_scale_since = state["lr_scale"], state["lr_scale_since"]
        self.max_grad_norm = state["max_grad_norm"]
        # snapshots written before router groups had their own scale: none
        self.group_lr_scale = {int(i): float(s) for i, s in state.get("group_lr_scale", [])}


def choose_actions(findings: tuple[Finding, ...], rollbacks_in_window: int, *, calm_before: bool = False) -> list[str]:
    """The actions a rollback applies, from the findings that triggered it.

    Data-caused trouble (a run of spikes that skipping could not end) gets only the rollback itself — the
    PaLM recipe: restart earlier and skip the offending batches — unless it is already a repeat.

    Args:
        findings: The findings of the step that rolled back.
        rollbacks_in_window: Rollbacks in the escalation window, this one included.
        calm_before: The steps before were healthy updates (`keel.recover.recovery.Recovery`): non-finite
            parameters then were written between steps, not made by an update (see the module docstring).
    """
    kinds = {f.kind for f in findings if f.severity == "critical"}
    params_broken = any(f.kind == "non_finite" and f.signal == keys.PARAM_NORM for f in findings)
    written_between_steps = params_broken and calm_before and rollbacks_in_window <= 1
    if written_between_steps and kinds <= {"non_finite"}:
        return []
    actions = []
    if kinds & MODEL_CAUSED_KINDS or rollbacks_in_window > 1 or not kinds <= {"loss_spike", "grad_spike", "non_finite"}:
        actions.append("lr_backoff")
    if params_broken:
        actions.append("reset_moments")
    if any(f.kind == "grad_spike" and f.baseline == f.baseline for f in findings):
        actions.append("tighten_clipping")
    return actions


def router_caused(findings: tuple[Finding, ...]) -> bool:
    """Whether every critical finding is a router's (`ROUTER_KINDS`), and there is one."""
    kinds = {f.kind for f in findings if f.severity == "critical"}
    return bool(kinds) and kinds <= ROUTER_KINDS


def router_param_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """The indices of ``optimizer``'s param groups that hold router parameters only (the routers
    `keel.signals.router.find_routers` finds: the router probe's); empty when the routers share their groups.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> router_param_groups(model, torch.optim.SGD(model.parameters(), lr=0.1))
        ()
    """
    ids = {id(p) for site in find_routers(model) for p in site.module.parameters()}
    groups = optimizer.param_groups
    return tuple(i for i, g in enumerate(groups) if g["params"] and all(id(p) in ids for p in g["params"]))


def router_lr_cuts(
    state: ActionState, optimizer: torch.optim.Optimizer, router_groups: Sequence[int], lr_backoff: float
) -> dict[int, float]:
    """Group → factor for the router groups whose LR (with the cuts in force) is above every other group's: the
    router's LR is the odd one out. Each is cut by ``lr_backoff``, or further, down to the highest other LR, in one
    rollback (a router at 100× the rest's LR cut by 0.1 locked again, and its second rollback went back 100 steps).
    Once a router group is no longer above the rest, its trouble points at the whole model's LR. Empty when no
    router group is above the rest.
    """
    lrs = [float(g["lr"]) * state.group_lr_scale.get(i, 1.0) for i, g in enumerate(optimizer.param_groups)]
    rest = [lr for i, lr in enumerate(lrs) if i not in router_groups and optimizer.param_groups[i]["params"]]
    if not rest:
        return {}
    top = max(rest) * (1 + 1e-9)  # a router cut down to the rest's LR is at it, whatever the rounding
    return {i: min(lr_backoff, top / lrs[i]) for i in router_groups if lrs[i] > top}


def apply_actions(
    actions: list[str],
    state: ActionState,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    lr_backoff: float,
    cooldown_steps: int | None,
    findings: tuple[Finding, ...],
    router_groups: Sequence[int] = (),
) -> list[str]:
    """Apply ``actions``; returns one sentence per action for the decision's reason.

    ``router_groups`` (`router_param_groups`): when the findings are a router's alone (`router_caused`) and a
    router group's LR is above the others' (`router_lr_cuts`), the LR back-off cuts those groups only.
    """
    done = []
    cuts = router_lr_cuts(state, optimizer, router_groups, lr_backoff) if router_caused(findings) else {}
    for action in actions:
        if action == "lr_backoff" and cuts:
            for i, factor in cuts.items():
                state.group_lr_scale[i] = state.group_lr_scale.get(i, 1.0) * factor
            scales = ", ".join(f"{i}: × {state.group_lr_scale[i]:.3g}" for i in cuts)
            done.append(f"router LR (param group {scales}) from now on; the other groups' LR unchanged")
        elif action == "lr_backoff":
            state.lr_scale = current_lr_scale(state, step, cooldown_steps) * lr_backoff
            state.lr_scale_since = step
            done.append(f"LR × {state.lr_scale:.3g} from now on")
        elif action == "reset_moments":
            optimizer.state.clear()
            done.append("optimizer moments reset")
        elif action == "tighten_clipping":
            baselines = [f.baseline for f in findings if f.kind == "grad_spike" and f.baseline == f.baseline]
            limit = 2.0 * min(baselines)
            state.max_grad_norm = min(limit, state.max_grad_norm or limit)
            done.append(f"gradient norm clipped at {state.max_grad_norm:.3g}")
        else:
            raise ValueError(f"unknown action {action!r}; allowed: lr_backoff, reset_moments, tighten_clipping")
    return done


def current_lr_scale(state: ActionState, step: int, cooldown_steps: int | None) -> float:
    """The LR scale at ``step``: constant, or ramping back to 1 over ``cooldown_steps``."""
    if cooldown_steps is None or state.lr_scale == 1.0:
        return state.lr_scale
    progress = min(1.0, max(0.0, (step - state.lr_scale_since) / cooldown_steps))
    return state.lr_scale + (1.0 - state.lr_scale) * progress


def group_lr_scales(state: ActionState, step: int, cooldown_steps: int | None, n_groups: int) -> list[float]:
    """Each param group's LR scale at ``step``: the model's (`current_lr_scale`) times the group's own (a router
    group's back-off, which stays: its cause is that group's LR, not a passing state)."""
    scale = current_lr_scale(state, step, cooldown_steps)
    return [scale * state.group_lr_scale.get(i, 1.0) for i in range(n_groups)]
