"""Toy reproduction (Prieto et al. 2025, Fig. 1): without weight decay, ⊥AdamW generalises on modular
addition within a few hundred full-batch epochs while AdamW with float32 softmax cross-entropy fits the
training set and stalls on the test set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel.optim import OrthoGrad

P = 113


def _modular_addition(train_fraction: float = 0.4, seed: int = 0):
    a, b = torch.arange(P).repeat_interleave(P), torch.arange(P).repeat(P)
    x = torch.cat([F.one_hot(a, P), F.one_hot(b, P)], dim=1).float()  # (P², 226): two one-hot operands
    y = (a + b) % P
    order = torch.randperm(P * P, generator=torch.Generator().manual_seed(seed))
    n = int(train_fraction * P * P)
    return x[order[:n]], y[order[:n]], x[order[n:]], y[order[n:]]


def _train(orthogonal: bool, epochs: int = 200) -> tuple[float, float]:
    x_train, y_train, x_test, y_test = _modular_addition()
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # the paper's MLP: hidden [200, 200], no bias
        torch.nn.Linear(2 * P, 200, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(200, 200, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(200, P, bias=False),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0)
    if orthogonal:
        opt = OrthoGrad(opt)
    for _ in range(epochs):  # full batch
        loss = F.cross_entropy(model(x_train), y_train)  # float32 softmax cross-entropy
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_acc = (model(x_train).argmax(1) == y_train).float().mean().item()
        test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return train_acc, test_acc


@pytest.mark.slow
def test_orthograd_generalises_where_adamw_stalls() -> None:
    base_train, base_test = _train(orthogonal=False)
    ortho_train, ortho_test = _train(orthogonal=True)
    assert base_train == 1.0 and base_test < 0.05  # memorised, not generalised
    assert ortho_train == 1.0 and ortho_test > 0.9
