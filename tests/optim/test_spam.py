"""SPAM step by step against a float64 NumPy re-derivation of the paper's update rule."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

from keel.optim import SPAM
from keel.optim.spam import spam_warmup_scale


def _warmup64(k: int, interval: int, warmup: int) -> float:
    # Written from the reference's schedule: a CosineAnnealingLR(0.99, T_max = warmup + 1) restarted at
    # each reset, read at j = steps since the reset; 1 before the first reset and after the warm-up.
    if interval == 0 or k < interval or warmup == 0:
        return 1.0
    j = k - (k // interval) * interval
    if j >= warmup:
        return 1.0
    return 1.0 - 0.99 * (1.0 + np.cos(np.pi * j / (warmup + 1))) / 2.0


class SpamReference:
    """The SPAM rule in float64 for one tensor (arXiv 2501.06842, Alg. 1, with the reference's schedule)."""

    def __init__(self, p: np.ndarray, *, lr, betas, eps, wd, threshold, interval, warmup, grace, clip_unseen):
        self.p = p.astype(np.float64)
        self.m = np.zeros_like(self.p)
        self.v = np.zeros_like(self.p)
        self.k = 0
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.threshold, self.interval, self.warmup, self.grace = threshold, interval, warmup, grace
        self.clip_unseen = clip_unseen
        self.clipped_last = np.zeros(p.shape, dtype=bool)

    def step(self, g: np.ndarray) -> None:
        g = g.astype(np.float64).copy()
        self.k += 1
        k = self.k
        if self.interval and k % self.interval == 0:
            self.m[:] = 0.0
            self.v[:] = 0.0
        active = self.threshold != 0 and k >= self.grace and (not self.interval or k % self.interval >= self.grace)
        self.clipped_last[:] = False
        if active:
            spike = g**2 > self.threshold * self.v
            if not self.clip_unseen:
                spike &= self.v > 0
            g[spike] = np.sign(g[spike]) * np.sqrt(self.threshold * self.v[spike])
            self.clipped_last = spike
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g**2
        size = self.lr * _warmup64(k, self.interval, self.warmup) * np.sqrt(1 - self.b2**k) / (1 - self.b1**k)
        self.p = self.p - size * self.m / (np.sqrt(self.v) + self.eps)
        self.p = self.p * (1 - self.lr * self.wd)


HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, wd=0.1, threshold=3.0, interval=6, warmup=3, grace=2)


def _run_pair(
    steps: int,
    *,
    seed: int = 0,
    clip_unseen: bool = False,
    spike_at: int | None = None,
    foreach: bool | None = None,
):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(5, 7, generator=gen))
    ref = SpamReference(p.detach().numpy(), clip_unseen=clip_unseen, **HYPER)
    opt = SPAM(
        [p],
        lr=HYPER["lr"],
        betas=HYPER["betas"],
        eps=HYPER["eps"],
        weight_decay=HYPER["wd"],
        threshold=HYPER["threshold"],
        reset_interval=HYPER["interval"],
        warmup_steps=HYPER["warmup"],
        grace_steps=HYPER["grace"],
        clip_unseen=clip_unseen,
        foreach=foreach,
    )
    clipped_any = False
    for t in range(1, steps + 1):
        g = torch.randn(5, 7, generator=gen)
        if spike_at == t:
            g[2, 3] = 1000.0
        p.grad = g.clone()
        opt.step()
        ref.step(g.numpy())
        clipped_any |= bool(ref.clipped_last.any())
        np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=2e-5, atol=2e-6, err_msg=f"step {t}")
        assert torch.equal(p.grad, g), "SPAM must not modify p.grad"
    return p, opt, ref, clipped_any


@pytest.mark.parametrize("foreach", [None, True], ids=["tensor-major", "foreach"])
def test_matches_float64_through_resets_grace_and_warmup(foreach: bool | None) -> None:
    # 20 steps with ΔT = 6 cover three resets (6, 12, 18), the grace steps after each (no clipping at
    # k % 6 < 2), the cosine warm-up after each reset, and bias correction that is never reset.
    _, opt, ref, clipped_any = _run_pair(20, foreach=foreach)
    assert clipped_any, "threshold 3 must clip some entries, or the clipping path is untested"
    assert int(opt.state[next(iter(opt.state))]["step"].item()) == ref.k == 20


@pytest.mark.parametrize("foreach", [None, True], ids=["tensor-major", "foreach"])
def test_injected_spike_is_clamped_to_sqrt_threshold_v(foreach: bool | None) -> None:
    p, opt, ref, _ = _run_pair(9, spike_at=9, foreach=foreach)  # k = 9: 9 % 6 = 3 ≥ grace, clipping active
    assert ref.clipped_last[2, 3]
    state = opt.state[p]
    # m after the step = β1·m_prev + (1−β1)·sqrt(θ·v_prev): the 1000 never reached the moments.
    assert state["exp_avg"][2, 3].item() == pytest.approx(ref.m[2, 3], rel=1e-5)
    assert abs(state["exp_avg"][2, 3].item()) < 10.0


def test_reset_step_zeroes_moments_and_keeps_bias_count() -> None:
    p, opt, _, _ = _run_pair(6)  # k = 6 is a reset step
    state = opt.state[p]
    g = p.grad.double().numpy()
    # After the reset, one update from zero moments: m = (1−β1)·g (no clipping: 6 % 6 = 0 < grace).
    np.testing.assert_allclose(state["exp_avg"].numpy(), 0.1 * g, rtol=1e-6)
    np.testing.assert_allclose(state["exp_avg_sq"].numpy(), 0.01 * g**2, rtol=1e-6)
    assert state["step"].item() == 6.0


@pytest.mark.parametrize("foreach", [None, True], ids=["tensor-major", "foreach"])
def test_unseen_entries_are_spared_by_default_and_zeroed_like_the_reference_on_request(foreach) -> None:
    for clip_unseen, expected_moves in ((False, True), (True, False)):
        p = torch.nn.Parameter(torch.ones(4))
        opt = SPAM(
            [p],
            lr=0.1,
            threshold=5000.0,
            reset_interval=0,
            grace_steps=2,
            clip_unseen=clip_unseen,
            foreach=foreach,
        )
        for _ in range(3):  # entry 0 never gets a gradient during the grace period
            p.grad = torch.tensor([0.0, 1.0, 1.0, 1.0])
            opt.step()
        before = p.detach().clone()
        p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
        opt.step()
        assert (p[0].item() != before[0].item()) is expected_moves


def test_warmup_scale_follows_the_reference_cosine() -> None:
    for k in range(1, 40):
        assert spam_warmup_scale(k, reset_interval=10, warmup_steps=4) == pytest.approx(_warmup64(k, 10, 4))
    assert spam_warmup_scale(10, reset_interval=10, warmup_steps=4) == pytest.approx(0.01)  # 1% at the reset
    assert spam_warmup_scale(5, reset_interval=10, warmup_steps=4) == 1.0  # no warm-up before the first reset


def test_state_dict_round_trip_continues_identically() -> None:
    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        return model, SPAM(model.parameters(), lr=1e-2, reset_interval=5, grace_steps=1, warmup_steps=2)

    def train(model, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randn(8, 3, generator=gen)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    a, opt_a = build(0)
    train(a, opt_a, 7, seed=1)
    b, opt_b = build(123)
    b.load_state_dict(a.state_dict())
    # deepcopy stands in for torch.save/load: torch's load_state_dict keeps same-dtype tensors as they are,
    # so loading a live optimizer's state_dict would share its moment tensors.
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    train(a, opt_a, 6, seed=2)
    train(b, opt_b, 6, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_groups_and_scheduler_use_each_groups_lr() -> None:
    gen = torch.Generator().manual_seed(3)
    p1, p2 = (
        torch.nn.Parameter(torch.randn(3, generator=gen)),
        torch.nn.Parameter(torch.randn(2, generator=gen)),
    )
    opt = SPAM([{"params": [p1], "lr": 0.1}, {"params": [p2], "weight_decay": 0.5}], lr=0.01, threshold=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    refs = [
        SpamReference(
            p.detach().numpy(),
            lr=lr,
            betas=(0.9, 0.999),
            eps=1e-6,
            wd=wd,
            threshold=0.0,
            interval=500,
            warmup=150,
            grace=20,
            clip_unseen=False,
        )
        for p, lr, wd in ((p1, 0.1, 0.0), (p2, 0.01, 0.5))
    ]
    for _ in range(3):
        for p, ref in zip((p1, p2), refs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            ref.lr = opt.param_groups[0 if p is p1 else 1]["lr"]
        opt.step()
        for p, ref in zip((p1, p2), refs, strict=True):
            ref.step(p.grad.numpy())
            np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=1e-5)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 8)


def test_edge_cases_zero_grad_empty_bf16_nan() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    empty = torch.nn.Parameter(torch.zeros(0))
    opt = SPAM([p, empty], lr=0.1, weight_decay=0.1, grace_steps=0)
    for _ in range(3):
        p.grad, empty.grad = torch.zeros(3), torch.zeros(0)
        opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.99**3))  # only the decay acts
    half = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    ref = SpamReference(
        half.detach().float().numpy(),
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-6,
        wd=0.0,
        threshold=5000.0,
        interval=500,
        warmup=150,
        grace=20,
        clip_unseen=False,
    )
    opt_half = SPAM([half], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = torch.randn(4, 4, generator=gen).bfloat16()
        half.grad = g
        opt_half.step()
        ref.step(g.float().numpy())
    assert half.dtype == torch.bfloat16 and opt_half.state[half]["exp_avg"].dtype == torch.bfloat16
    np.testing.assert_allclose(half.detach().float().numpy(), ref.p, atol=2e-2)
    p.grad = torch.tensor([float("nan"), 0.0, 0.0])
    opt.step()
    assert torch.isnan(p[0]) and torch.isfinite(p[1:]).all()  # NaN is not a spike: keel.Guard must skip it


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas[1]"),
        ({"eps": -1e-8}, "eps"),
        ({"threshold": -1.0}, "threshold"),
        ({"reset_interval": 2.5}, "reset_interval"),
        ({"grace_steps": -1}, "grace_steps"),
        ({"weight_decay": math.nan}, "weight_decay"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"SPAM.{field}=")):
        SPAM([torch.nn.Parameter(torch.zeros(1))], **kwargs)
