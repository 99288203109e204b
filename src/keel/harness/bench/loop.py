"""The training loop every step-time benchmark times: the same steps, bare or under a `Guard`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel.guard import Guard


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Sequence[tuple[Tensor, Tensor]],
    guard: Guard | None,
    n: int,
    signals: Callable[[], Mapping[str, Tensor]] | None = None,
    batch_ids: Callable[[int], Sequence[int]] | None = None,
    example_signals: Callable[[Tensor], Mapping[str, Any]] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """``n`` language-model steps over ``data`` (cycled): forward, backward, then ``guard.step`` — or the
    optimizer alone when there is no guard. Waits for the device at the end, so a timer around it is honest.
    ``signals``: makes the loop's own ``signals=`` dict for each ``guard.step`` (an RL loop's). ``batch_ids``: the
    example ids of the i-th batch; each ``guard.step`` then gets ``batch_ids=`` and ``batch=`` (a loop that tells
    keel what it trained on, for `keel.Attribution` and the skip list). ``example_signals``: the loop keeps each
    sequence's loss (the step's loss is their mean) and makes its ``signals=`` from them (``keel.signals.
    source_losses``). ``loss_fn``: the step's loss from ``(x, y)`` in place of the cross-entropy (a loop that adds a
    z-loss or a distillation term, or trains on another loss); not with ``example_signals``. ``scaler``: a
    ``torch.amp.GradScaler``: the loop backpropagates ``scaler.scale(loss)``; without a guard it steps and updates
    the scaler itself (a guard was given it and does both)."""
    if loss_fn is not None and example_signals is not None:
        raise ValueError("train_steps: loss_fn and example_signals together; allowed: one of them")
    for i in range(n):
        x, y = data[i % len(data)]
        step_signals = None
        if loss_fn is not None:
            loss = loss_fn(x, y)
        elif example_signals is None:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        else:
            losses = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)
            loss = losses.mean()
            step_signals = example_signals(losses)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if guard is not None:
            ids = None if batch_ids is None else batch_ids(i)
            guard.step(
                loss,
                signals=step_signals if signals is None else signals(),
                batch_ids=ids,
                batch=None if ids is None else (x, y),
            )
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if data and data[0][0].device.type == "cuda":
        torch.cuda.synchronize()


def example_lm_losses(model: nn.Module, batch: Any) -> Tensor:
    """Each sequence's mean next-token loss (the `keel.Attribution` ``loss_fn`` of `train_steps`'s loop)."""
    x, y = batch
    return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)
