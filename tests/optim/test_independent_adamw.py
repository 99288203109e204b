"""AdamW with independent weight decay: decay follows the schedule multiplier, not the LR."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from keel._core.errors import KeelWarning
from keel.optim import IndependentAdamW


@pytest.mark.parametrize("lr", [1e-4, 1.0, 30.0])
def test_decay_does_not_scale_with_peak_lr(lr: float) -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = IndependentAdamW([p], lr=lr, weight_decay=0.01)
    for _ in range(3):
        p.grad = torch.zeros(4)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), np.full(4, 0.99**3), rtol=1e-6)


def test_decay_follows_the_schedule_multiplier() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = IndependentAdamW([p], lr=0.3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: [1.0, 0.5, 0.25][min(step, 2)])
    expected = 1.0
    for factor in (1.0, 0.5, 0.25):
        p.grad = torch.zeros(2)
        opt.step()
        sched.step()
        expected *= 1 - factor * 0.1
        assert p[0].item() == pytest.approx(expected, rel=1e-6)


def test_matches_float64_adam_with_independent_decay() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, generator=gen))
    ref = p.detach().double().numpy()
    m, v = np.zeros(5), np.zeros(5)
    lr, b1, b2, eps, lam = 0.05, 0.9, 0.95, 1e-8, 0.02
    opt = IndependentAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=lam)
    for k in range(1, 6):
        g = torch.randn(5, generator=gen)
        p.grad = g
        opt.step()
        g64 = g.double().numpy()
        ref = ref * (1 - lam)  # s_t = 1: no scheduler
        m = b1 * m + (1 - b1) * g64
        v = b2 * v + (1 - b2) * g64**2
        ref = ref - lr * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
        np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-5)


def test_groups_state_dict_and_validation() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = IndependentAdamW(
        [{"params": [a]}, {"params": [b], "independent_weight_decay": 0.5}], lr=2.0, weight_decay=0.1
    )
    extra = torch.nn.Parameter(torch.ones(1))
    opt.add_param_group({"params": [extra], "lr": 7.0})
    for q in (a, b, extra):
        q.grad = torch.zeros_like(q)
    opt.step()
    assert a[0].item() == pytest.approx(0.9) and b[0].item() == pytest.approx(0.5)
    assert extra[0].item() == pytest.approx(0.9)
    saved = copy.deepcopy(opt.state_dict())
    fresh = IndependentAdamW(
        [{"params": [torch.nn.Parameter(torch.ones(3))]}, {"params": [torch.nn.Parameter(torch.ones(3))]}],
        lr=1.0,
    )
    fresh.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))]})
    fresh.load_state_dict(saved)
    assert fresh.param_groups[1]["independent_weight_decay"] == 0.5
    assert fresh.param_groups[2]["initial_lr"] == 7.0
    with pytest.raises(ValueError, match="IndependentAdamW.weight_decay="):
        IndependentAdamW([a], weight_decay=-1.0)


def test_a_groups_own_weight_decay_is_its_lambda_and_zero_means_no_decay() -> None:
    # nanoGPT's configure_optimizers groups, handed to the drop-in: the no-decay group was decayed by the
    # constructor's λ, its 0.0 overwritten without a word (reviewer V3)
    w, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4))
    opt = IndependentAdamW([{"params": [w], "weight_decay": 1e-3}, {"params": [b], "weight_decay": 0.0}], lr=1e-3)
    for _ in range(100):
        w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
        opt.step()
    assert b[0].item() == 1.0
    assert w[0, 0].item() == pytest.approx((1 - 1e-3) ** 100, rel=1e-5)
    assert [g["independent_weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    # independent_weight_decay in a group wins over its weight_decay; a group added later too
    c = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [c], "weight_decay": 0.5, "independent_weight_decay": 0.0})
    assert opt.param_groups[-1]["independent_weight_decay"] == 0.0


def test_lambda_above_one_percent_per_step_is_warned_once() -> None:
    # AdamW's coupled weight_decay=0.1 passed as it is: 10 % of the weights gone every step
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.warns(KeelWarning, match=r"weight_decay=0.1 shrinks the weights by 10% every step") as caught:
        IndependentAdamW(
            [{"params": [p], "weight_decay": 0.1}, {"params": [torch.nn.Parameter(torch.ones(1))]}], weight_decay=0.2
        )
    assert len([w for w in caught if issubclass(w.category, KeelWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IndependentAdamW([p], lr=6e-4, weight_decay=1e-4)


@pytest.mark.parametrize("placeholder", [0.0, 1e-5])
def test_a_loop_writing_an_lr_above_the_peak_is_warned_once(placeholder: float) -> None:
    # built with a placeholder lr (0.0: warm-up from 0), the loop writing 6e-4 itself: the decay followed the
    # placeholder (none at all for 0), silently (reviewer V17)
    p = torch.nn.Parameter(torch.ones(3))
    opt = IndependentAdamW([p], lr=placeholder, weight_decay=1e-3)
    with pytest.warns(KeelWarning, match=r"lr=0.0006 is above the group's peak LR initial_lr=") as caught:
        for _ in range(3):
            opt.param_groups[0]["lr"] = 6e-4
            p.grad = torch.zeros(3)
            opt.step()
    assert len([w for w in caught if issubclass(w.category, KeelWarning)]) == 1
    # built with the peak, the same loop is quiet and decays by λ per step at the peak
    q = torch.nn.Parameter(torch.ones(3))
    peak = IndependentAdamW([q], lr=6e-4, weight_decay=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            peak.param_groups[0]["lr"] = 6e-4
            q.grad = torch.zeros(3)
            peak.step()
    assert q[0].item() == pytest.approx((1 - 1e-3) ** 3)


def test_a_torch_adamw_state_loads_and_keeps_this_optimizers_lambda_and_peak() -> None:
    # a run switching from AdamW loads its checkpoint: the first step raised KeyError 'initial_lr' (reviewer V18)
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    adamw = torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.1)
    a(torch.randn(8, 4)).square().mean().backward()
    adamw.step()
    mine = IndependentAdamW(b.parameters(), lr=2e-3, weight_decay=1e-4)
    mine.load_state_dict(adamw.state_dict())
    group = mine.param_groups[0]
    assert group["independent_weight_decay"] == 1e-4 and group["initial_lr"] == 2e-3 and group["lr"] == 1e-3
    b(torch.randn(8, 4)).square().mean().backward()
    mine.step()  # the moments are AdamW's: continued, not restarted
    assert int(mine.state[b.weight]["step"]) == 2


def test_a_deepcopied_optimizer_still_warns_once_about_an_lr_above_its_peak() -> None:
    """The once-only flags were instance attributes that ``Optimizer.__getstate__`` drops: the copy raised
    AttributeError '_warned_above_peak' at the first step whose LR was above the peak."""
    p = torch.nn.Parameter(torch.ones(3))
    copied = copy.deepcopy(IndependentAdamW([p], lr=1e-3, weight_decay=1e-4))
    copied.param_groups[0]["lr"] = 1e-2
    copied.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.warns(KeelWarning, match="above the group's peak"):
        copied.step()
