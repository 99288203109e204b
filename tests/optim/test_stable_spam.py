"""Stable-SPAM step by step against float64 re-derivations: the paper's rule (keel's default) and the
official code's reset step (``reset_like_reference=True``)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from keel.optim import StableSPAM
from keel.optim.stable_spam import momentum_decay_scale


def _cosine64(t: int, decay_steps: int | None, decay_min: float) -> float:
    if decay_steps is None:
        return 1.0
    if t >= decay_steps + 1:
        return decay_min
    return decay_min + (1 - decay_min) * (1 + np.cos(np.pi * t / (decay_steps + 1))) / 2


class StableSpamReference:
    """Stable-SPAM (arXiv 2502.17055) for one tensor in float64.

    ``like_reference=False``: zero m, v before the reset step's update (k = 1), and count the AdaClip/AdaGN
    bias corrections with the never-reset t. ``True``: the official code's order — the reset step updates
    the old m, v with k = 1 and zeroes them afterwards; one counter k drives every bias correction.
    """

    def __init__(
        self,
        p,
        *,
        lr,
        betas,
        eps,
        wd,
        gamma1,
        gamma2,
        gamma3,
        interval,
        decay_steps,
        decay_min,
        like_reference,
    ):
        self.p = p.astype(np.float64)
        self.m, self.v = np.zeros_like(self.p), np.zeros_like(self.p)
        self.k = self.t = 0
        self.max_ema = self.norm_ema = self.norm_sq_ema = 0.0
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.g1, self.g2, self.g3 = gamma1, gamma2, gamma3
        self.interval, self.decay_steps, self.decay_min = interval, decay_steps, decay_min
        self.like_reference = like_reference
        self.last_clipped = False
        self.last_input_norm = 0.0

    def step(self, grad) -> None:
        g = grad.astype(np.float64).copy()
        self.t += 1
        self.k += 1
        s = _cosine64(self.t, self.decay_steps, self.decay_min)
        count = self.k if self.like_reference else self.t
        self.p *= 1 - self.lr * self.wd
        gmax = np.abs(g).max()
        self.max_ema = self.g3 * self.max_ema + (1 - self.g3) * gmax
        thr = self.max_ema / (1 - self.g3**count)
        spiked = np.abs(g) > thr
        self.last_clipped = bool(spiked.any())
        g[spiked] = g[spiked] / gmax * thr
        n = np.sqrt((g**2).sum())
        g1 = self.g1 * s
        self.norm_ema = g1 * self.norm_ema + (1 - g1) * n
        self.norm_sq_ema = self.g2 * self.norm_sq_ema + (1 - self.g2) * n**2
        c = (self.norm_ema / (1 - g1**count)) / (np.sqrt(self.norm_sq_ema / (1 - self.g2**count)) + self.eps)
        if n > 0:
            g = g / n * c
        self.last_input_norm = float(np.sqrt((g**2).sum()))
        reset = self.interval and self.t % self.interval == 0
        if reset:
            self.k = 1
            if not self.like_reference:
                self.m[:] = 0.0
                self.v[:] = 0.0
        b1 = self.b1 * s
        self.m = b1 * self.m + (1 - b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g**2
        denom = np.sqrt(self.v) / np.sqrt(1 - self.b2**self.k) + self.eps
        self.p -= self.lr / (1 - b1**self.k) * self.m / denom
        if reset and self.like_reference:
            self.m[:] = 0.0
            self.v[:] = 0.0


def _hyper(**over):
    h = dict(
        lr=1e-2,
        betas=(0.9, 0.99),
        eps=1e-8,
        wd=0.05,
        gamma1=0.7,
        gamma2=0.9,
        gamma3=0.9,
        interval=7,
        decay_steps=None,
        decay_min=0.5,
        like_reference=False,
        foreach=None,
    )
    h.update(over)
    return h


def _optimizer(params, h):
    return StableSPAM(
        params,
        lr=h["lr"],
        betas=h["betas"],
        eps=h["eps"],
        weight_decay=h["wd"],
        gamma1=h["gamma1"],
        gamma2=h["gamma2"],
        gamma3=h["gamma3"],
        reset_interval=h["interval"],
        decay_steps=h["decay_steps"],
        decay_min=h["decay_min"],
        reset_like_reference=h["like_reference"],
        foreach=h["foreach"],
    )


def _compare(steps: int, h: dict, *, seed: int = 0, spikes: dict[int, float] | None = None, shape=(6, 5)):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    ref = StableSpamReference(p.detach().numpy(), **{k: v for k, v in h.items() if k != "foreach"})
    opt = _optimizer([p], h)
    clipped = 0
    for t in range(1, steps + 1):
        g = torch.randn(shape, generator=gen) * (1 + 0.3 * np.sin(t))
        if spikes and t in spikes:
            g[1, 1] = spikes[t]
        p.grad = g.clone()
        opt.step()
        ref.step(g.numpy())
        clipped += ref.last_clipped
        np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=3e-5, atol=3e-6, err_msg=f"step {t}")
        assert torch.equal(p.grad, g)
    return p, opt, ref, clipped


@pytest.mark.parametrize("foreach", [None, True], ids=["tensor-major", "foreach"])
@pytest.mark.parametrize("like_reference", [False, True])
def test_matches_float64_through_resets(like_reference: bool, foreach: bool | None) -> None:
    # 22 steps with ΔT = 7: resets at 7, 14, 21, AdaClip active (γ3 = 0.9 reacts fast), weight decay.
    _, opt, ref, clipped = _compare(22, _hyper(like_reference=like_reference, foreach=foreach))
    # The reference's shared counter re-inflates the clip threshold after each reset, so it clips less.
    assert clipped >= (1 if like_reference else 3), "AdaClip must have clipped, or its path is untested"
    state = next(iter(opt.state.values()))
    assert int(state["step"].item()) == ref.k and int(state["norm_step"].item()) == ref.t == 22


@pytest.mark.parametrize("foreach", [None, True], ids=["tensor-major", "foreach"])
def test_matches_float64_with_cosine_momentum_decay(foreach: bool | None) -> None:
    _compare(18, _hyper(decay_steps=10, decay_min=0.5, gamma3=0.999, interval=0, foreach=foreach))


def test_reset_step_quirk_differs_only_where_documented() -> None:
    h = _hyper(interval=5, gamma3=0.999)
    p_keel, *_ = _compare(5, h)
    p_ref, *_ = _compare(5, _hyper(interval=5, gamma3=0.999, like_reference=True))
    p4_keel, *_ = _compare(4, h)
    p4_ref, *_ = _compare(4, _hyper(interval=5, gamma3=0.999, like_reference=True))
    assert torch.equal(p4_keel, p4_ref)  # identical until the first reset (counters agree before it)
    assert not torch.allclose(p_keel, p_ref)  # and different on it: fresh moments vs the old ones at k = 1


@pytest.mark.parametrize("foreach", [None, True], ids=["tensor-major", "foreach"])
def test_injected_spike_is_clipped_and_gradient_norm_stays_bounded(foreach: bool | None) -> None:
    p, opt, ref, _ = _compare(30, _hyper(gamma3=0.999, interval=0, foreach=foreach), spikes={30: 1e4})
    assert ref.last_clipped
    # AdaGN hands Adam a gradient of norm m̂_n/(sqrt(v̂_n)+ε) ≤ 1 (Jensen), however large the spike.
    assert ref.last_input_norm <= 1.0
    # keel's own moments saw what the reference's did: the 1e4 never reached Adam.
    state = opt.state[p]
    np.testing.assert_allclose(state["exp_avg"].numpy(), ref.m, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(state["exp_avg_sq"].numpy(), ref.v, rtol=1e-4, atol=1e-9)
    assert state["exp_avg"].abs().max().item() < 1.0


@pytest.mark.parametrize("like_reference", [False, True])
def test_spikes_in_a_few_rows_take_the_row_wise_path_and_match_float64(like_reference: bool) -> None:
    # 40 rows, a spike in one row: on CPU only that row is clipped (≤ 1/8 of the rows are hot), its
    # moment rows recomputed after the dense update; the result must equal the dense rule.
    h = _hyper(gamma3=0.999, interval=9, like_reference=like_reference)
    _, _, ref, clipped = _compare(20, h, shape=(40, 5), spikes={12: 300.0, 13: -250.0, 19: 80.0})
    assert clipped >= 3


def test_momentum_decay_scale_holds_at_the_end() -> None:
    assert momentum_decay_scale(0, decay_steps=10, decay_min=0.5) == 1.0
    assert momentum_decay_scale(11, decay_steps=10, decay_min=0.5) == pytest.approx(0.5)
    assert momentum_decay_scale(500, decay_steps=10, decay_min=0.5) == 0.5  # the reference climbs back up
    assert momentum_decay_scale(7, decay_steps=None, decay_min=0.5) == 1.0


def test_state_dict_round_trip_and_groups_with_scheduler() -> None:
    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        params = list(model.parameters())
        opt = StableSPAM([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}], lr=1e-2, reset_interval=4)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def train(model, opt, sched, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            model(torch.randn(8, 3, generator=gen)).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    a, oa, sa = build(0)
    train(a, oa, sa, 6, 1)
    b, ob, sb = build(9)
    b.load_state_dict(a.state_dict())
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    sb.load_state_dict(sa.state_dict())
    train(a, oa, sa, 5, 2)
    train(b, ob, sb, 5, 2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert oa.param_groups[1]["lr"] == pytest.approx(3e-3 * 0.5**5)


def test_edge_cases_zero_grad_bf16_empty() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    empty = torch.nn.Parameter(torch.zeros(0))
    opt = StableSPAM([p, empty], lr=0.1)
    opt_foreach = StableSPAM([torch.nn.Parameter(torch.ones(3))], lr=0.1, foreach=True)
    for _ in range(3):
        q = opt_foreach.param_groups[0]["params"][0]
        q.grad = torch.zeros(3)
        opt_foreach.step()
        assert torch.equal(q.detach(), torch.ones(3))
        p.grad, empty.grad = torch.zeros(3), torch.zeros(0)
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))  # zero gradient: no update, no NaN
    half = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    h = _hyper(wd=0.0, interval=0)
    ref = StableSpamReference(half.detach().float().numpy(), **{k: v for k, v in h.items() if k != "foreach"})
    opt_half = _optimizer([half], h)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = torch.randn(4, 4, generator=gen).bfloat16()
        half.grad = g
        opt_half.step()
        ref.step(g.float().numpy())
    assert opt_half.state[half]["norm_ema"].dtype == torch.float32  # statistics stay float32
    np.testing.assert_allclose(half.detach().float().numpy(), ref.p, atol=3e-2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -1.0}, "lr"),
        ({"gamma1": 1.0}, "gamma1"),
        ({"gamma3": -0.1}, "gamma3"),
        ({"reset_interval": -1}, "reset_interval"),
        ({"decay_steps": 0}, "decay_steps"),
        ({"decay_min": 2.0}, "decay_min"),
        ({"reset_like_reference": 1}, "reset_like_reference"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"StableSPAM.{field}=")):
        StableSPAM([torch.nn.Parameter(torch.zeros(1))], **kwargs)


@pytest.mark.parametrize("shape", [(6, 5), (40, 5)], ids=["dense-clip", "row-wise-clip-shape"])
@pytest.mark.parametrize("foreach", [None, True], ids=["tensor-major", "foreach"])
def test_spike_whose_square_overflows_float32_matches_float64(foreach: bool | None, shape: tuple[int, int]) -> None:
    # A finite 1e25 entry: clipped to M̂ ≈ 3e23, its n² = 1e47 overflowed the float32 statistics (and ‖g‖ itself
    # overflowed the float32 norm): norm_ema = inf, parameters NaN. float64 handles it; keel must follow.
    h = _hyper(gamma3=0.999, interval=0, foreach=foreach)
    p, opt, ref, clipped = _compare(36, h, shape=shape, spikes={30: 1e25, 33: -3e37})
    assert clipped >= 2 and torch.isfinite(p).all()
    state = opt.state[p]
    assert state["norm_rms_ema"].item() == pytest.approx(np.sqrt(ref.norm_sq_ema), rel=3e-5)


@pytest.mark.parametrize("foreach", [None, True], ids=["tensor-major", "foreach"])
def test_spike_size_beyond_the_clip_does_not_change_the_updates(foreach: bool | None) -> None:
    # M is updated before the clip (the paper's order), so the clipped spike scales with the spike: 1e25 and 1e6
    # spikes (all entries) must give the same parameters after a few more steps, not NaN.
    finals = []
    for size in (1e6, 1e25):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, generator=gen))
        opt = StableSPAM([p], lr=1e-3, foreach=foreach)
        for t in range(40):
            g = torch.randn(64, generator=gen) * 0.01
            p.grad = g * (size / 0.01) if t == 30 else g
            opt.step()
        finals.append(p.detach().clone())
    assert torch.isfinite(finals[1]).all()
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-4, atol=1e-6)


def test_state_saved_with_the_squared_norm_statistic_loads_and_continues() -> None:
    # keel before 0.x kept v_n as "norm_sq_ema"; such a state is converted to r_n = sqrt(v_n) on the next step.
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(5, generator=gen)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [StableSPAM([p], lr=1e-2, reset_interval=0) for p in params]
    grads = [torch.randn(5, generator=gen) for _ in range(6)]
    for g in grads[:3]:
        for p, opt in zip(params, opts, strict=True):
            p.grad = g.clone()
            opt.step()
    old = copy.deepcopy(opts[1].state_dict())
    for state in old["state"].values():
        state["norm_sq_ema"] = state.pop("norm_rms_ema").square()
    opts[1].load_state_dict(old)
    for g in grads[3:]:
        for p, opt in zip(params, opts, strict=True):
            p.grad = g.clone()
            opt.step()
    assert "norm_sq_ema" not in opts[1].state[params[1]]
    torch.testing.assert_close(params[1], params[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [None, True], ids=["tensor-major", "foreach"])
def test_gradients_at_the_float32_maximum_match_float64(foreach: bool | None) -> None:
    # Every entry 3e38: the norm statistics sit near float32's maximum and their bias corrections (÷0.3, ÷0.316)
    # overflowed to inf/inf = NaN in the foreach kernel.
    h = _hyper(wd=0.0, interval=0, foreach=foreach)
    p = torch.nn.Parameter(torch.ones(64))
    ref = StableSpamReference(p.detach().numpy(), **{k: v for k, v in h.items() if k != "foreach"})
    opt = _optimizer([p], h)
    for _ in range(3):
        g = torch.full((64,), 3e38)
        p.grad = g
        opt.step()
        ref.step(g.numpy())
        np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=3e-5, atol=3e-6)
