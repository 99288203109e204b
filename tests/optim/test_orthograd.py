"""⊥Grad: the projection against float64, orthogonality of the update, and the wrapper contract."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from keel.optim import OrthoGrad, orthogonalize_


def _project64(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    w, g = w.astype(np.float64).ravel(), g.astype(np.float64).ravel()
    perp = g - (w @ g) / (w @ w + 1e-30) * w
    return perp * np.linalg.norm(g) / (np.linalg.norm(perp) + 1e-30)


def test_projection_matches_float64_and_keeps_the_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(7, 5, generator=gen), torch.randn(11, generator=gen)]
    gs = [torch.randn(7, 5, generator=gen) + 0.5 * ws[0], torch.randn(11, generator=gen)]
    expected = [_project64(w.numpy(), g.numpy()) for w, g in zip(ws, gs, strict=True)]
    norms = [g.norm().item() for g in gs]
    orthogonalize_(ws, gs)
    for w, g, e, n in zip(ws, gs, expected, norms, strict=True):
        np.testing.assert_allclose(g.numpy().ravel(), e, rtol=1e-5, atol=1e-6)
        assert g.norm().item() == pytest.approx(n, rel=1e-5)
        assert abs(torch.dot(w.ravel(), g.ravel()).item()) <= 1e-5 * w.norm().item() * g.norm().item()


def test_sgd_update_is_orthogonal_to_the_weights() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = OrthoGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(16, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        for w, p in zip(before, model.parameters(), strict=True):
            update = (p.detach() - w).ravel()
            cos = torch.dot(update.double(), w.ravel().double()) / (update.norm() * w.norm() + 1e-30)
            assert abs(cos.item()) < 1e-5


def test_zero_weights_and_zero_gradients() -> None:
    w, g = torch.zeros(4), torch.tensor([1.0, -2.0, 0.0, 3.0])
    orthogonalize_([w], [g])
    assert torch.equal(g, torch.tensor([1.0, -2.0, 0.0, 3.0]))  # nothing to project out of
    w, g = torch.ones(4), torch.zeros(4)
    orthogonalize_([w], [g])
    assert torch.equal(g, torch.zeros(4))
    w, g = torch.ones(3), torch.ones(3) * 2  # parallel: nothing is left, and no NaN
    orthogonalize_([w], [g])
    assert torch.isfinite(g).all()


def test_bf16_gradients() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, generator=gen).bfloat16()
    g = torch.randn(64, generator=gen).bfloat16()
    expected = _project64(w.float().numpy(), g.float().numpy())
    orthogonalize_([w], [g])
    assert g.dtype == torch.bfloat16
    np.testing.assert_allclose(g.float().numpy(), expected, atol=3e-2)


def test_wrapper_shares_groups_hyperparameters_and_scheduler_with_the_base() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-25, weight_decay=0.0)
    opt = OrthoGrad(base)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(1e-3)  # the reference's scheduler never reaches the base
    assert base.param_groups[0]["betas"] == (0.8, 0.95) and base.param_groups[0]["eps"] == 1e-25
    extra = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert base.param_groups[-1]["params"] == [extra] and len(opt.param_groups) == 2


def test_state_dict_round_trip_reaches_the_base() -> None:
    def build(seed, betas):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        return model, OrthoGrad(torch.optim.AdamW(model.parameters(), lr=1e-2, betas=betas))

    def train(model, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            model(torch.randn(8, 3, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()

    a, oa = build(0, (0.9, 0.99))
    train(a, oa, 4, 1)
    b, ob = build(5, (0.5, 0.5))  # different betas: loading must bring (0.9, 0.99) into the base
    b.load_state_dict(a.state_dict())
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    assert ob.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert ob.param_groups is ob.optimizer.param_groups
    train(a, oa, 4, 2)
    train(b, ob, 4, 2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_closure_and_type_check() -> None:
    model = torch.nn.Linear(2, 1)
    opt = OrthoGrad(torch.optim.SGD(model.parameters(), lr=0.1))

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).square().sum()
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        OrthoGrad(model.parameters())  # type: ignore[arg-type]
