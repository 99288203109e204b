"""A rollback's reseed keeps processes seeded apart apart (reviewer V10 of session 13: under torchrun every rank was
reseeded to the same number, and all ranks drew the same batches and dropout masks for the rest of the run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keel import Guard, RecoveryConfig
from tests.conftest import TinyNet


def _draw_after_rollback(seed: int) -> list[float]:
    """A rank's loop: the model seeded alike on every rank, the data seeded per rank; an Inf weight at step 12."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, policy="recover", recovery=RecoveryConfig(snapshot_every=5))
    torch.manual_seed(seed)
    for step in range(16):
        x = torch.randn(8, model.fc1.in_features)
        F.mse_loss(model(x), torch.zeros(8, model.fc2.out_features)).backward()
        if step == 12:
            with torch.no_grad():
                model.fc1.weight[0, 0] = float("inf")
        if guard.step(F.mse_loss(model(x), torch.zeros(8, model.fc2.out_features)).detach()).action == "rollback":
            guard.close()
            return torch.randn(4).tolist()  # the next batch this rank would draw
        opt.zero_grad()
    raise AssertionError("no rollback")


def test_ranks_seeded_apart_draw_apart_after_a_rollback_and_alike_when_seeded_alike():
    rank0, rank1 = _draw_after_rollback(1234), _draw_after_rollback(1235)
    assert rank0 != rank1
    assert _draw_after_rollback(1234) == rank0  # reproducible
