"""Actions applied after a rollback, chosen by what the diagnosis says went wrong.

| action             | what it does                                         | when                                     |
|--------------------|------------------------------------------------------|------------------------------------------|
| `lr_backoff`       | scales each group's LR by `lr_backoff` (compounding) | model-caused trouble, repeated rollbacks |
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

The LR scale is applied around ``optimizer.step()`` only, so a scheduler (chainable or not) never sees it.
With ``cooldown_steps`` it ramps linearly back to 1 over that many steps; by default it stays, as OPT-175B's
lowered LR did, because a recipe that diverged once at an LR tends to diverge again there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from keel._core import keys
from keel._core.finding import Finding

MODEL_CAUSED_KINDS = frozenset({"divergence", "non_finite"})
HISTORY_KEY = "actions"  # `ActionState`'s key in `TrainingState.history`, and so in every snapshot
# Disk snapshots written before keel called these "actions" hold the same state under this key.
LEGACY_HISTORY_KEY = "remedy"


@dataclass
class ActionState:
    """What the actions have changed so far; part of the run's history in every snapshot."""

    lr_scale: float = 1.0
    lr_scale_since: int = 0  # step the current scale was set (for the cool-down ramp)
    max_grad_norm: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.lr_scale, "lr_scale_since": self.lr_scale_since, "max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale, self.lr_scale_since = state["lr_scale"], state["lr_scale_since"]
        self.max_grad_norm = state["max_grad_norm"]


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


def apply_actions(
    actions: list[str],
    state: ActionState,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    lr_backoff: float,
    cooldown_steps: int | None,
    findings: tuple[Finding, ...],
) -> list[str]:
    """Apply ``actions``; returns one sentence per action for the decision's reason."""
    done = []
    for action in actions:
        if action == "lr_backoff":
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
