"""Shared fixtures: tiny models and a healthy training loop, CPU and deterministic."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from torch import nn

# Property tests draw new examples on every local run (more of the input space over time); CI (`.ci/run` sets
# KEEL_CI=1) draws the same ones every time, so that a landing never hangs on one rare draw of a statistical claim.
# A failure either way prints the example that reproduces it.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("KEEL_CI"):
    settings.load_profile("ci")


class TinyNet(nn.Module):
    """Two linear layers; small enough that every test runs in milliseconds."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def one_torch_thread():
    """Tiny models on one intra-op thread: more only add contention on a shared CPU. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batches(n: int, seed: int = 0, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g), torch.randn(batch, 4, generator=g)) for _ in range(n)]


def observe_poisoned_run(run_dir, steps: int = 80, poisoned_at: int = 60):
    """A TinyNet run under an observing Guard whose batch ``poisoned_at`` has targets ×30 (the loss jumps
    ~900×); returns the closed guard."""
    import torch.nn.functional as F

    from keel import Guard

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, policy="observe", run_dir=str(run_dir))
    for step, (x, y) in enumerate(make_batches(steps)):
        if step == poisoned_at:
            y = y * 30.0
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return guard
