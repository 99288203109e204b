"""fp16 mixed precision with a dynamic loss scale, as a guarded CPU run: an MLP regressing a fixed teacher network.

The loop is PyTorch's AMP recipe: the forward pass under ``torch.autocast("cpu", dtype=torch.float16)`` (the linear
layers compute in fp16, so their gradients do too), the loss in float32, ``scaler.scale(loss).backward()``, and the
`Guard` stepping through the ``torch.amp.GradScaler("cpu")`` it was given — it unscales, records the scale and the
overflow flag (``amp/scale``, ``amp/overflow``), and lets the scaler skip and back off. A small ``growth_interval``
makes the scaler probe upwards often, so even a short run shows the healthy sawtooth: grow, overflow, back off.
``target_growth(step)`` multiplies the regression targets, the way unnormalised targets drift (value targets as
returns grow): the gradients grow with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from keel.detect import default_detectors
from keel.guard import Guard
from keel.harness.scenarios._common import ScenarioResult

DIM, HIDDEN, BATCH = 32, 256, 64
GROWTH_INTERVAL = 25


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def train_fp16(
    name: str,
    *,
    seed: int,
    steps: int,
    target_growth: Callable[[int], float] | None = None,
    lr: float = 1e-3,
) -> ScenarioResult:
    """One fp16 AMP run under an observing `Guard` (default probes and detectors)."""
    teacher, model = mlp(10_000 + seed), mlp(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", growth_interval=GROWTH_INTERVAL)
    data = torch.Generator().manual_seed(seed)
    guard = Guard(model, optimizer, policy="observe", scaler=scaler, detectors=default_detectors())
    losses = []
    start = time.perf_counter()
    with guard:
        for step in range(steps):
            x = torch.randn(BATCH, DIM, generator=data)
            with torch.no_grad():
                y = teacher(x) * (1.0 if target_growth is None else target_growth(step))
            with torch.autocast("cpu", dtype=torch.float16):
                pred = model(x)
            loss = F.mse_loss(pred.float(), y)
            scaler.scale(loss).backward()
            guard.step(loss)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return ScenarioResult(name=name, losses=losses, findings=list(guard.findings), wall_s=time.perf_counter() - start)
