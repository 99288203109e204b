"""The training loop every step-time benchmark times: the same steps, bare or under a `Guard`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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
) -> None:
    """``n`` language-model steps over ``data`` (cycled): forward, backward, then ``guard.step`` — or the
    optimizer alone when there is no guard. Waits for the device at the end, so a timer around it is honest.
    ``signals``: makes the loop's own ``signals=`` dict for each ``guard.step`` (an RL loop's)."""
    for i in range(n):
        x, y = data[i % len(data)]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if guard is not None:
            guard.step(loss, signals=None if signals is None else signals())
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if data and data[0][0].device.type == "cuda":
        torch.cuda.synchronize()
