"""Contract tests over the optimizer registry: every registered optimizer must pass them."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from keel.optim import create_optimizer, list_optimizers
from tests.integrations.test_compile import GraphCounter

# Per-optimizer keyword arguments for the contract (a new optimizer without an entry fails here).
SETTINGS: dict[str, dict] = {
    "spam": dict(lr=3e-2, grace_steps=5, reset_interval=50, warmup_steps=10),
    "stable_spam": dict(lr=3e-2, reset_interval=50),
    "orthograd": dict(lr=3e-2),
    "independent_adamw": dict(lr=3e-2, weight_decay=1e-4),
}


def test_every_registered_optimizer_has_settings() -> None:
    assert sorted(SETTINGS) == list_optimizers()


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen)
    y = x @ torch.randn(5, 2, generator=gen) + 0.01 * torch.randn(64, 2, generator=gen)
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)), x, y


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_lowers_the_loss_of_a_small_regression(name: str) -> None:
    model, x, y = _problem()
    opt = create_optimizer(name, model.parameters(), **SETTINGS[name])
    first = None
    for _ in range(200):
        loss = (model(x) - y).square().mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_state_dict_round_trip_with_scheduler_and_two_groups(name: str) -> None:
    def build(seed):
        model, x, y = _problem(seed)
        params = list(model.parameters())
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": SETTINGS[name]["lr"] / 3}]
        opt = create_optimizer(name, groups, **SETTINGS[name])
        return model, x, y, opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

    def train(model, x, y, opt, sched, steps):
        for _ in range(steps):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
            sched.step()

    a, x, y, oa, sa = build(0)
    train(a, x, y, oa, sa, 7)
    b, _, _, ob, sb = build(1)
    b.load_state_dict(a.state_dict())
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    sb.load_state_dict(sa.state_dict())
    train(a, x, y, oa, sa, 6)
    train(b, x, y, ob, sb, 6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert oa.param_groups[1]["lr"] == pytest.approx(SETTINGS[name]["lr"] / 3 * 0.9**13)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_zero_lr_group_does_not_move(name: str) -> None:
    model, x, y = _problem()
    params = list(model.parameters())
    frozen = [p.detach().clone() for p in params[:2]]
    opt = create_optimizer(name, [{"params": params[:2], "lr": 0.0}, {"params": params[2:]}], **SETTINGS[name])
    for _ in range(3):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    for before, p in zip(frozen, params[:2], strict=True):
        assert torch.equal(before, p)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_rejects_negative_lr(name: str) -> None:
    with pytest.raises(ValueError, match="lr|learning rate"):  # orthograd: the base optimizer's message
        create_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], **{**SETTINGS[name], "lr": -1.0})


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="stable_spam"):
        create_optimizer("adam2", [torch.nn.Parameter(torch.zeros(1))])


# orthograd and independent_adamw trace torch's AdamW step: 3-5 s each on CPU.
COMPILED_STEP = [
    n if n in ("spam", "stable_spam") else pytest.param(n, marks=pytest.mark.slow) for n in sorted(SETTINGS)
]


@pytest.mark.parametrize("name", COMPILED_STEP)
def test_a_step_inside_a_compiled_function_updates_as_in_eager_mode(name: str) -> None:
    """PyTorch's compiled-optimizer recipe, ``torch.compile(lambda: opt.step())``. SPAM's and Stable-SPAM's step
    runs eagerly there (their update is planned on the host): before, the CPU path raised inside functionalization
    (the fused AdamW kernel) and the foreach path recompiled at every step."""
    torch._dynamo.reset()
    model, x, y = _problem()
    compiled_model = copy.deepcopy(model)
    eager_opt = create_optimizer(name, model.parameters(), **SETTINGS[name])
    compiled_opt = create_optimizer(name, compiled_model.parameters(), **SETTINGS[name])
    backend = GraphCounter()
    compiled_step = torch.compile(lambda: compiled_opt.step(), backend=backend)
    for _ in range(3):
        for m in (model, compiled_model):
            (m(x) - y).square().mean().backward()
        eager_opt.step()
        compiled_step()
        eager_opt.zero_grad()
        compiled_opt.zero_grad()
    for a, b in zip(model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # torch's AdamW traced: its own rounding
    if name in ("spam", "stable_spam"):
        assert backend.compiled == 0
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), compiled_model.parameters(), strict=True))


def _train(model, opt, x, y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_copied_or_unpickled_optimizer_continues_as_the_original(name: str, copier: str) -> None:
    """``Optimizer.__getstate__`` keeps defaults, state and groups only: a copy of SPAM/StableSPAM had no scratch
    buffers and one of OrthoGrad no base optimizer (AttributeError at the first step)."""
    model, x, y = _problem()
    opt = create_optimizer(name, model.parameters(), **SETTINGS[name])
    _train(model, opt, x, y, 3)
    copy_model, copy_opt = (
        copy.deepcopy((model, opt)) if copier == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    )
    _train(model, opt, x, y, 4)
    _train(copy_model, copy_opt, x, y, 4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy_model.parameters(), strict=True))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_state_dict_of_torch_adamw_loads_and_its_moments_carry_on(name: str) -> None:
    """Switching a run from torch's AdamW: SPAM/StableSPAM raised KeyError ('threshold', 'norm_step') at the first
    step, the groups and states lacking their own settings and statistics."""
    model, x, y = _problem()
    adamw = torch.optim.AdamW(model.parameters(), lr=SETTINGS[name]["lr"])
    _train(model, adamw, x, y, 5)
    opt = create_optimizer(name, model.parameters(), **SETTINGS[name])
    opt.load_state_dict(adamw.state_dict())
    moments = [adamw.state[p]["exp_avg"].clone() for p in model.parameters()]
    _train(model, opt, x, y, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for p, before in zip(model.parameters(), moments, strict=True):
        assert opt.state[p]["exp_avg"].shape == before.shape and not torch.equal(opt.state[p]["exp_avg"], before)
        assert int(opt.state[p]["step"]) == 8  # AdamW's 5, then 3 more: the count came along
