"""⊥Grad: the projection against float64, orthogonality of the update, and the wrapper contract."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from keel.optim import OrthoGrad, orthogonalize_
from keel.optim import orthograd as orthograd_module


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


@pytest.mark.parametrize("magnitude", [1e19, 1e25, 1e36])
def test_gradient_whose_squares_overflow_float32_matches_float64(magnitude: float) -> None:
    # Σg² overflowed float32 and the factor was inf/inf = NaN: a finite gradient with a well-defined projection.
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(256, generator=gen)
    g = (torch.randn(256, generator=gen) + 0.3 * w) * magnitude
    expected = _project64(w.numpy(), g.numpy())
    orthogonalize_([w], [g])
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-5, atol=1e-6 * magnitude)


def test_bf16_gradient_of_overflowing_norm_matches_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, generator=gen).bfloat16()
    g = (torch.randn(256, generator=gen) * 1e30).bfloat16()
    expected = _project64(w.float().numpy(), g.float().numpy())
    orthogonalize_([w], [g])
    assert torch.isfinite(g).all()
    np.testing.assert_allclose(g.float().numpy(), expected, rtol=0, atol=1e-2 * 1e30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearly_parallel_low_precision_gradient_keeps_no_parallel_part(dtype: torch.dtype) -> None:
    # ‖g⊥‖ = 0.01·‖g‖: the coefficient rounded to bf16 left a parallel part of 7e-3·‖g‖ (4.8× the error of
    # rounding the exact result; 3.6× in float16); applied in two parts, the error stays within 2.5× it.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4096, generator=gen)
    noise = torch.randn(4096, generator=gen)
    noise -= (noise @ w) / (w @ w) * w
    w, g = w.to(dtype), (w + 0.01 * noise * w.norm() / noise.norm()).to(dtype)
    expected = torch.from_numpy(_project64(w.float().numpy(), g.float().numpy()))
    best = (expected.to(dtype).double() - expected).norm() / expected.norm()
    orthogonalize_([w], [g])
    error = (g.double() - expected).norm() / expected.norm()
    assert error <= 2.5 * best
    cosine = (g.double() @ w.double()) / (g.double().norm() * w.double().norm())
    assert abs(cosine) <= 2.5 * best


def test_huge_finite_gradient_spike_keeps_orthograd_adamw_finite_like_adamw() -> None:
    # A spike whose squares overflow float32 made ⊥AdamW's parameters NaN where torch's AdamW stays finite.
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(256, generator=gen) * 0.01 for _ in range(12)]
    grads[5] = grads[5] * 1e21
    start = torch.randn(256, generator=gen)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    plain = torch.optim.AdamW([params[0]], lr=1e-3)
    ortho = OrthoGrad(torch.optim.AdamW([params[1]], lr=1e-3))
    for g in grads:
        for p, opt in zip(params, (plain, ortho), strict=True):
            p.grad = g.clone()
            opt.step()
    assert torch.isfinite(params[0]).all() and torch.isfinite(params[1]).all()
    assert not torch.equal(params[1], start)


def test_weights_whose_norm_overflows_leave_the_gradient_finite() -> None:
    w = torch.full((64,), 3e38)  # w·w = inf and w·g = inf: inf/inf would put NaN into g; it stays as it was
    g = torch.linspace(0.5, 1.0, 64)
    original = g.clone()
    orthogonalize_([w], [g])
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_scaling_pass_changes_no_bit(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU skips the scaling pass for norms below 2^64; accelerators always take it. Both must give the same bits.
    gen = torch.Generator().manual_seed(4)
    ws = [torch.randn(9, 7, generator=gen).to(dtype), torch.randn(5, generator=gen).to(dtype)]
    gs = [(torch.randn(9, 7, generator=gen) * 3e3).to(dtype), (torch.randn(5, generator=gen) * 1e-3).to(dtype)]
    skipped = [g.clone() for g in gs]
    orthogonalize_(ws, skipped)
    monkeypatch.setattr(orthograd_module, "_SAFE_NORM", 0.0)
    orthogonalize_(ws, gs)
    for a, b in zip(gs, skipped, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_gradient_parallel_to_its_weights_projects_to_zero_not_to_rescaled_rounding_noise(dtype) -> None:
    # Reviewer X's X6: for a 1-element parameter g is parallel to w, so g⊥ is rounding residue, which the rescale
    # ‖g‖/‖g⊥‖ blew up to the full gradient (0.123 → ±0.123, the sign flipping when w moved by one ulp; as the
    # official orthograd.py does). Exactly, g⊥ = 0.
    for w0 in (0.3, 0.3 + 2**-25, 1.7, -0.9):
        w, g = torch.tensor([w0], dtype=dtype), torch.tensor([0.123], dtype=dtype)
        orthogonalize_([w], [g])
        assert g.item() == 0.0
    w = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(dtype)
    g = 2 * w  # parallel, 64 entries
    orthogonalize_([w], [g])
    assert torch.count_nonzero(g) == 0
    # a gradient with an orthogonal part above rounding keeps its projection (float64 reference)
    noise = torch.randn(64, generator=torch.Generator().manual_seed(1)).double()
    w64 = w.double()
    noise -= (noise @ w64) / (w64 @ w64) * w64
    g = (2 * w64 + 0.05 * noise * (2 * w64).norm() / noise.norm()).to(dtype)
    expected = torch.from_numpy(_project64(w.double().numpy(), g.double().numpy()))
    orthogonalize_([w], [g])
    tolerance = max(64 * torch.finfo(dtype).eps, 1e-5) * expected.norm().item()
    assert torch.allclose(g.double(), expected, rtol=0, atol=tolerance)
