"""Sharpness probe: λ_max, trace and margins against an explicit float64 Hessian; no side effects."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel.signals.sharpness import SharpnessConfig, SharpnessProbe, hutchinson_trace, top_eigenvalue
from tests.signals.contexts import step_context


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    return model, x, y


def explicit_hessian(model, x, y) -> np.ndarray:
    params = [p.detach().double().clone() for p in model.parameters()]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss_of(vec):
        chunks, i = [], 0
        for s in shapes:
            n = int(np.prod(s))
            chunks.append(vec[i : i + n].reshape(s))
            i += n
        h = torch.tanh(x.double() @ chunks[0].T + chunks[1])
        return F.mse_loss(h @ chunks[2].T + chunks[3], y.double())

    return torch.autograd.functional.hessian(loss_of, flat).numpy()


def ctx(model, opt, step=0):
    return step_context(model, opt, step=step, log_step=False)


def test_operators_on_explicit_matrices():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    a = torch.tensor(a + a.T)
    g = torch.Generator().manual_seed(0)
    eig = np.linalg.eigvalsh(a.numpy())
    top = eig.max()  # the largest algebraic eigenvalue; this matrix's largest in magnitude is negative (-4.0)
    assert float(
        top_eigenvalue(lambda v: [a.float() @ v[0]], [torch.zeros(6)], iters=30, generator=g)
    ) == pytest.approx(top, rel=1e-3)
    estimate = float(hutchinson_trace(lambda v: [a.float() @ v[0]], [torch.zeros(6)], probes=4000, generator=g))
    assert estimate == pytest.approx(float(np.trace(a.numpy())), abs=0.15 * np.abs(a.numpy()).sum() ** 0.5)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_probe_matches_explicit_hessian_and_sgd_margin(momentum):
    model, x, y = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    probe = SharpnessProbe(lambda: F.mse_loss(model(x), y), iters=40, trace_probes=2000)
    out = probe.measure(ctx(model, opt))
    hessian = explicit_hessian(model, x, y)
    eig = np.linalg.eigvalsh(hessian)
    assert float(out["curvature/sharpness"]) == pytest.approx(eig.max(), rel=1e-3)
    assert float(out["curvature/trace"]) == pytest.approx(np.trace(hessian), rel=0.1)
    assert float(out["curvature/margin"]) == pytest.approx(0.05 * eig.max() / (2 + 2 * momentum), rel=1e-3)
    assert "curvature/preconditioned_sharpness" not in out


def test_adam_margin_uses_the_preconditioned_sharpness():
    model, x, y = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999))
    for _ in range(3):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    probe = SharpnessProbe(lambda: F.mse_loss(model(x), y), iters=40, trace_probes=0)
    out = probe.measure(ctx(model, opt))
    d = []
    for p in model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        d.append(((1 - 0.9 ** (t + 1)) * ((st["exp_avg_sq"].double() / (1 - 0.999**t)).sqrt() + 1e-8)).reshape(-1))
    scale = torch.cat(d).rsqrt().numpy()
    pre = scale[:, None] * explicit_hessian(model, x, y) * scale[None, :]
    top = np.linalg.eigvalsh(pre).max()
    assert float(out["curvature/preconditioned_sharpness"]) == pytest.approx(top, rel=1e-2)
    assert float(out["curvature/margin"]) == pytest.approx(0.01 * top * 0.1 / 3.8, rel=1e-2)


def test_no_side_effects_on_params_grads_optimizer_buffers_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    F.mse_loss(model(x), y).backward()
    opt.step()
    F.mse_loss(model(x), y).backward()
    state = copy.deepcopy((model.state_dict(), [p.grad.clone() for p in model.parameters()], opt.state_dict()))
    rng = torch.get_rng_state()
    SharpnessProbe(lambda: F.mse_loss(model(x), y), iters=3, trace_probes=2).measure(ctx(model, opt))
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in state[0].items():
        assert torch.equal(v, model.state_dict()[k]), k  # includes the BatchNorm running statistics
    assert all(torch.equal(a, p.grad) for a, p in zip(state[1], model.parameters(), strict=True))
    after = opt.state_dict()
    for k, entry in state[2]["state"].items():
        assert all(torch.equal(v, after["state"][k][f]) for f, v in entry.items())


def test_schedule_lr_jump_and_missing_closure():
    model, x, y = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = SharpnessProbe(lambda: F.mse_loss(model(x), y), every=10, iters=2, trace_probes=0)
    seen = []
    for step in range(6):
        if step == 4:
            opt.param_groups[0]["lr"] = 0.05  # a 5× jump: measured at once
        seen.append(bool(probe.measure(ctx(model, opt, step))))
    assert seen == [True, False, False, False, True, False]
    with pytest.warns(UserWarning, match="no closure"):
        assert SharpnessProbe().measure(ctx(model, opt)) == {}
    with pytest.raises(ValueError, match=r"SharpnessConfig.lr_jump=1; allowed: a finite number > 1"):
        SharpnessConfig(lr_jump=1)


def test_adam_without_state_gives_sharpness_but_no_margin():
    model, x, y = tiny_problem()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    out = SharpnessProbe(lambda: F.mse_loss(model(x), y), iters=5, trace_probes=0).measure(ctx(model, opt))
    assert "curvature/sharpness" in out and "curvature/margin" not in out  # no v̂ yet: no preconditioner


@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_low_precision_model_matches_the_float64_hessian_of_its_rounded_weights(dtype, rel):
    """A bf16/fp16 model: Hessian-vector products in its own precision still find λ_max of the float64
    Hessian of the same (rounded) weights, to that precision's accuracy."""
    model, x, y = tiny_problem()
    model = model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = SharpnessProbe(lambda: F.mse_loss(model(x.to(dtype)).float(), y), iters=40, trace_probes=0)
    got = float(probe.measure(ctx(model, opt))["curvature/sharpness"])
    eig = np.linalg.eigvalsh(explicit_hessian(model, x.to(dtype).float(), y))
    assert np.isfinite(got) and got == pytest.approx(eig.max(), rel=rel)


@pytest.mark.parametrize("lrs", [(0.0, 0.05), (0.01, 0.05), (0.05, 0.0)])
def test_margin_with_per_group_learning_rates_weights_the_hessian_by_each_groups_lr(lrs):
    # the margin used group 0's LR only: with group 0 at LR 0 it said 0 however fast the other group went
    model, x, y = tiny_problem()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": lrs[0]}, {"params": model[2].parameters(), "lr": lrs[1]}]
    )
    out = SharpnessProbe(lambda: F.mse_loss(model(x), y), iters=40, trace_probes=0).measure(ctx(model, opt))
    sizes = [p.numel() for p in model.parameters()]
    d = np.concatenate([np.full(n, lr) for n, lr in zip(sizes, [lrs[0]] * 2 + [lrs[1]] * 2, strict=True)])
    weighted = np.sqrt(d)[:, None] * explicit_hessian(model, x, y) * np.sqrt(d)[None, :]  # D^½ H D^½
    assert float(out["curvature/margin"]) == pytest.approx(np.linalg.eigvalsh(weighted).max() / 2, rel=1e-3)
    assert float(out["curvature/sharpness"]) == pytest.approx(
        np.linalg.eigvalsh(explicit_hessian(model, x, y)).max(), rel=1e-3
    )


def test_lr_jump_of_any_group_triggers_a_measurement():
    model, x, y = tiny_problem()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters(), "lr": 0.01}]
    )
    probe = SharpnessProbe(lambda: F.mse_loss(model(x), y), every=10, iters=2, trace_probes=0)
    seen = []
    for step in range(4):
        if step == 2:
            opt.param_groups[1]["lr"] = 0.05  # only the second group jumps
        seen.append(bool(probe.measure(ctx(model, opt, step))))
    assert seen == [True, False, True, False]


def test_loss_not_twice_differentiable_is_one_clear_error_and_no_parameters_is_nothing():
    from torch.autograd.function import once_differentiable

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    model, x, y = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = SharpnessProbe(lambda: Square.apply(model(x) - y).mean(), iters=2, trace_probes=0)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        probe.measure(ctx(model, opt))
    constant = SharpnessProbe(lambda: torch.ones((), requires_grad=True) * 2, iters=2, trace_probes=0)
    assert constant.measure(ctx(model, opt)) == {}  # nothing to measure: no crash, no made-up value


def test_an_overflowing_operator_gives_nan_not_zero():
    # a float16 model's double backward can overflow to NaN; the old power iteration reported "sharpness 0"
    g = torch.Generator().manual_seed(0)
    nan = top_eigenvalue(lambda v: [v[0] * float("nan")], [torch.zeros(3)], iters=3, generator=g)
    assert torch.isnan(nan)
    assert float(top_eigenvalue(lambda v: [v[0] * 0], [torch.zeros(3)], iters=3, generator=g)) == 0.0


def quadratic_probe(eigenvalues, seed=0):
    """A loss ½θᵀAθ with a known spectrum (rotated, so no coordinate is an eigenvector) and its float64 Hessian."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    theta = nn.Parameter(torch.randn(len(eigenvalues), generator=g))
    model = nn.Module()
    model.theta = theta
    closure = lambda: 0.5 * theta @ a.float() @ theta  # noqa: E731
    reference = torch.autograd.functional.hessian(lambda t: 0.5 * t @ a @ t, theta.detach().double())
    return model, closure, reference


@pytest.mark.parametrize(
    "eigenvalues",
    [
        [-5.0, -1.0, 0.5, 2.0],  # the negative one is the largest in magnitude: power iteration said -5
        [-3.0, 0.1, 1.0, 3.0],  # equal magnitudes: power iteration oscillated between the two
        [-2.0, -1.0, -0.5],  # concave: λ_max is negative, and that is the answer
        [4.0, 1.0, -0.2, 0.0],
    ],
)
def test_sharpness_is_the_largest_algebraic_eigenvalue_of_an_indefinite_hessian(eigenvalues):
    model, closure, hessian = quadratic_probe(eigenvalues)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = SharpnessProbe(closure, iters=len(eigenvalues) + 2, trace_probes=0).measure(ctx(model, opt))
    top = float(torch.linalg.eigvalsh(hessian).max())
    assert float(out["curvature/sharpness"]) == pytest.approx(top, abs=1e-4)
    assert float(out["curvature/margin"]) == pytest.approx(0.1 * top / 2, abs=1e-5)


def test_tanh_mlp_with_an_indefinite_hessian_gets_its_positive_top_eigenvalue():
    model, x, y = tiny_problem()
    eig = np.linalg.eigvalsh(explicit_hessian(model, x, y))
    assert eig.min() < 0 < eig.max()  # the premise: an indefinite Hessian
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = SharpnessProbe(lambda: F.mse_loss(model(x), y), trace_probes=0).measure(ctx(model, opt))  # default iters
    assert float(out["curvature/sharpness"]) == pytest.approx(eig.max(), rel=1e-3)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    eigenvalues=st.lists(st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: round(v, 3)), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_top_eigenvalue_equals_the_float64_eigvalsh_maximum_within_its_hvp_budget(eigenvalues, seed):
    """Any symmetric spectrum (indefinite, repeated, zero, negative-dominant): λ_max to float32 accuracy,
    never above the true one, and never more than ``iters`` operator applications."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    calls, a32 = [], a.float()

    def operator(v):
        calls.append(1)
        return [a32 @ v[0]]

    iters = 2 * n + 2
    got = float(top_eigenvalue(operator, [torch.zeros(n)], iters=iters, generator=g))
    top, scale = float(torch.linalg.eigvalsh(a).max()), max(abs(v) for v in eigenvalues) + 1e-3
    assert got == pytest.approx(top, abs=1e-4 * scale)
    assert got <= top + 1e-4 * scale
    assert len(calls) <= iters


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_operator_gives_nan(bad):
    g = torch.Generator().manual_seed(0)
    assert torch.isnan(top_eigenvalue(lambda v: [v[0] * bad], [torch.zeros(3)], iters=4, generator=g))
