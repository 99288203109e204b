"""Adam update RMS and ε-dominance against the optimizer's own step and a float64 formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keel.signals.adam_eps import AdamEpsProbe, adam_update_stats
from tests.signals.contexts import step_context


def ctx(model, opt, step=0):
    return step_context(model, opt, step=step)


def test_update_matches_what_adam_applies_next():
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    # with the gradient zeroed, the next step applies exactly the stored moments' update (times β's)
    state = opt.state[model.weight]
    step = float(state["step"])
    m = state["exp_avg"].double() * 0.9
    v = state["exp_avg_sq"].double() * 0.99
    expected = (m / (1 - 0.9 ** (step + 1))) / ((v / (1 - 0.99 ** (step + 1))).sqrt() + 1e-8)
    sq, n, _ = adam_update_stats(m.float(), v.float(), step + 1, 0.9, 0.99, 1e-8)
    assert float((sq / n).sqrt()) == pytest.approx(float(expected.square().mean().sqrt()), rel=1e-5)
    before = model.weight.detach().clone()
    model.weight.grad = torch.zeros_like(model.weight)
    opt.step()
    applied = (before - model.weight.detach()).double() / 0.1
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-6)


def test_eps_dominated_counts_live_elements_below_eps():
    m = torch.tensor([1e-9, 1e-3, 0.0, 1e-10])
    v = torch.tensor([1e-20, 1e-6, 0.0, 1e-18])  # √v: 1e-10 (< ε), 1e-3, dead, 1e-9 (< ε)
    _, live, dominated = adam_update_stats(m, v, 1.0, 0.0, 0.0, 1e-8)
    assert float(live) == 3.0 and float(dominated) == 2.0


def test_probe_cadence_and_non_adam_optimizers():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    probe = AdamEpsProbe(every=2)
    assert probe.measure(ctx(model, opt, 0)) == {}  # no state before the first step
    opt.step()
    out = probe.measure(ctx(model, opt, 2))
    assert set(out) == {"adam/update_rms", "adam/eps_dominated", "adam/eps_dominated/"}
    assert probe.measure(ctx(model, opt, 3)) == {}
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.step()
    assert probe.measure(ctx(model, sgd, 0)) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_probe_matches_float64_formula_over_every_tensor_in_low_precision(dtype):
    """The whole probe (all tensors, dead elements, ε-dominated ones) against a float64 re-derivation, with
    Adam's moments held in the parameters' own precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3, bias=False)).to(dtype)
    eps = 1e-3  # large enough that some elements are ε-dominated in every precision
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=eps)
    for _ in range(2):
        (1e-2 * model(torch.randn(4, 6, dtype=dtype)).float().square().mean()).backward()
        opt.step()
        opt.zero_grad()
    opt.state[model[0].weight]["exp_avg_sq"][0, :3] = 0  # three elements that never saw a gradient
    opt.state[model[0].weight]["exp_avg"][0, :3] = 0
    out = AdamEpsProbe(every=1).measure(ctx(model, opt))
    squares, size, live, dominated = 0.0, 0, 0, 0
    for p in model.parameters():
        s = opt.state[p]
        t = float(s["step"])
        m, v = s["exp_avg"].double(), s["exp_avg_sq"].double()
        root_v = (v / (1 - 0.95**t)).sqrt()
        squares += float(((m / (1 - 0.8**t)) / (root_v + eps)).square().sum())
        size += v.numel()
        live += int((v > 0).sum())
        dominated += int(((v > 0) & (root_v < eps)).sum())
    assert 0 < dominated < live < size
    assert float(out["adam/update_rms"]) == pytest.approx((squares / size) ** 0.5, rel=1e-5)
    assert float(out["adam/eps_dominated"]) == pytest.approx(dominated / live, rel=1e-6)


def _measure(model, opt):
    return AdamEpsProbe(every=1).measure(step_context(model, opt))


def test_complex_parameters_are_measured_over_real_and_imaginary_parts():
    # torch's Adam keeps complex moments for complex parameters; the old probe failed on "exp_avg_sq > 0"
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    model = torch.nn.Module()
    model.w = w
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(2):
        (w.abs() ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    (w.abs() ** 2).sum().backward()
    st = opt.state[w]
    m, v = torch.view_as_real(st["exp_avg"]).double(), torch.view_as_real(st["exp_avg_sq"]).double()
    t = float(st["step"])
    update = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    got = _measure(model, opt)
    assert float(got["adam/update_rms"]) == pytest.approx(float(update.square().mean().sqrt()), rel=1e-4)


def test_groups_with_a_non_numeric_eps_are_skipped_and_a_zero_step_count_is_no_division_by_zero():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model(torch.randn(4, 3)).sum().backward()
    for st in opt.state.values():
        st["step"] = torch.tensor(0.0)  # a momentum reset that restarted the count
    got = _measure(model, opt)
    assert all(torch.isfinite(v).all() for v in (got["adam/update_rms"], got["adam/eps_dominated"]))
    opt.param_groups[0]["eps"] = (1e-30, 1e-3)  # Adafactor-style (eps1, eps2)
    assert _measure(model, opt) == {}
