"""Replay a bad step on the same batch to tell the data from a transient fault (``RecoveryConfig(replay=True)``).

When a step raises a critical spike or a non-finite value, the Guard recomputes it: same parameters (the update
has not been applied), same batch, the RNG streams as they were when the step began, buffers (batch-norm
statistics) put back afterwards. If the recomputed loss and gradient norm match the step's — within
``replay_rtol``, or non-finite both times — the batch did it, in this state: **data** (the decision stands; its
examples are attributed and skipped). If they do not, the first computation was wrong: a **transient** fault
(hardware, silent data corruption, a racy kernel): the update is skipped, and nothing is rolled back or added to
the skip list. This is Megatron's rerun state machine (`megatron/core/rerun_state_machine.py`) done in process,
for one step.

What replay cannot see: a fault that recurs on the same device (Megatron restarts on another GPU for that), and
randomness the loop draws between steps (a data-loader shuffle at an epoch boundary): a model with dropout then
replays with other masks — ``replay_rtol`` (10 % by default) covers that noise, not a spike's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keel.signals._hooks import quiet
from keel.signals.attribution import ExampleLossFn


@dataclass(frozen=True, kw_only=True)
class ReplayResult:
    """What the replay of one step found.

    Attributes:
        reproducible: The recomputation matched: the data (in this state) caused it.
        loss: The step's loss as the loop computed it.
        replay_loss: The recomputed loss.
        grad_norm: The step's gradient norm (before any clipping).
        replay_grad_norm: The recomputed gradient norm.
    """

    reproducible: bool
    loss: float
    replay_loss: float
    grad_norm: float
    replay_grad_norm: float

    def to_json(self) -> dict[str, Any]:
        return {
            "reproducible": self.reproducible,
            "loss": self.loss,
            "replay_loss": self.replay_loss,
            "grad_norm": self.grad_norm,
            "replay_grad_norm": self.replay_grad_norm,
        }

    def describe(self) -> str:
        return (
            f"replaying the step on the same batch gave loss {self.replay_loss:.4g} (was {self.loss:.4g}) and "
            f"gradient norm {self.replay_grad_norm:.4g} (was {self.grad_norm:.4g})"
        )


def matches(first: float, second: float, rtol: float) -> bool:
    """Both non-finite, or both finite and within ``rtol`` of each other (relative to the larger).

    Example:
        >>> matches(2.0, 2.1, 0.1), matches(2.0, 3.0, 0.1), matches(float("nan"), float("inf"), 0.1)
        (True, False, True)
    """
    if not (math.isfinite(first) and math.isfinite(second)):
        return not math.isfinite(first) and not math.isfinite(second)
    return abs(first - second) <= rtol * max(abs(first), abs(second), 1e-12)


class StepReplay:
    """Recomputes a step of ``model`` from the RNG state its step began with.

    Args:
        model: The model.
        params: The parameters whose gradient norm is compared (the Guard's trainable ones).
        rtol: Relative tolerance of the comparison.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], rtol: float) -> None:
        self.model, self.params, self.rtol = model, params, rtol
        self._rng: tuple[Tensor, list[Tensor]] | None = None

    def mark_step_start(self) -> None:
        """Remember the RNG streams now: the next step's forward pass starts from them (a few kB, no sync)."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        self._rng = (torch.get_rng_state(), cuda)

    def replay(self, loss_fn: ExampleLossFn, batch: Any, loss: float, grad_norm: float) -> ReplayResult:
        """Recompute the step's loss (the mean of ``loss_fn``'s per-example losses) and gradients; compare.

        The model's buffers and the RNG streams are as before on return; ``.grad`` holds the recomputed gradients.
        """
        buffers = [b.detach().clone() for b in self.model.buffers()]
        # keel's activation hooks stay quiet: this forward is not a training step, its values must not leak into
        # the next step's measurements
        with (
            quiet(),
            torch.random.fork_rng(devices=range(torch.cuda.device_count()) if self._rng and self._rng[1] else []),
        ):
            if self._rng is not None:
                torch.set_rng_state(self._rng[0])
                if self._rng[1]:
                    torch.cuda.set_rng_state_all(self._rng[1])
            for p in self.params:
                p.grad = None
            replayed = loss_fn(self.model, batch).float().mean()
            replayed.backward()
        with torch.no_grad():
            for live, saved in zip(self.model.buffers(), buffers, strict=True):
                live.copy_(saved)
            grads = [p.grad.detach().float().pow(2).sum() for p in self.params if p.grad is not None]
            replay_norm = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
        replay_loss = float(replayed.detach())
        return ReplayResult(
            reproducible=matches(loss, replay_loss, self.rtol) and matches(grad_norm, replay_norm, self.rtol),
            loss=loss,
            replay_loss=replay_loss,
            grad_norm=grad_norm,
            replay_grad_norm=replay_norm,
        )
