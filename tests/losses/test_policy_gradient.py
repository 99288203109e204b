"""clipped_policy_loss, group_advantages, informative_groups and k3_kl against float64 plain-Python loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.losses import (
    VERL_KL_CLAMP,
    VERL_LOG_RATIO_CLAMP,
    PolicyLoss,
    clipped_policy_loss,
    group_advantages,
    informative_groups,
    k3_kl,
)


def _pg_reference(logps, old, adv, mask, eps_low, eps_high, aggregation, kl=None, beta=0.0):
    """(loss, clip_low, clip_high) from nested lists, one token at a time."""
    per_seq, total, active, low, high = [], 0.0, 0, 0, 0
    for i in range(len(logps)):
        seq_total, seq_active = 0.0, 0
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            rho = math.exp(logps[i][t] - old[i][t])
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            value = -min(rho * a, clipped * a) + (beta * kl[i][t] if kl is not None else 0.0)
            seq_total, seq_active = seq_total + value, seq_active + 1
            low += rho < 1 - eps_low and a < 0
            high += rho > 1 + eps_high and a > 0
        per_seq.append(seq_total / max(seq_active, 1))
        total, active = total + seq_total, active + seq_active
    loss = total / max(active, 1) if aggregation == "token" else sum(per_seq) / len(per_seq)
    return loss, low / max(active, 1), high / max(active, 1)


def _batch(seed: int, batch: int = 5, tokens: int = 9, spread: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(batch, tokens, generator=g, dtype=torch.float64)
    logps = old + spread * torch.randn(batch, tokens, generator=g, dtype=torch.float64)  # ratios ≈ e^{±0.4}
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=g)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    return logps, old, adv, mask


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.28), (0.2, 0.2), (0.1, 0.5)])
def test_clipped_policy_loss_matches_a_float64_loop(aggregation: str, eps_low: float, eps_high: float) -> None:
    logps, old, adv, mask = _batch(0)
    out = clipped_policy_loss(logps, old, adv, mask, eps_low=eps_low, eps_high=eps_high, aggregation=aggregation)
    loss, low, high = _pg_reference(
        logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), eps_low, eps_high, aggregation
    )
    assert isinstance(out, PolicyLoss) and out.kl is None
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    assert (out.clip_low.item(), out.clip_high.item()) == pytest.approx((low, high), rel=1e-12)
    assert 0 < low + high  # the batch does exercise both clip sides


def test_defaults_are_dapo_clip_higher_and_token_level_loss() -> None:
    logps, old, adv, mask = _batch(1)
    out = clipped_policy_loss(logps, old, adv, mask)
    ref = _pg_reference(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, "token")
    assert out.loss.item() == pytest.approx(ref[0], rel=1e-12)
    grpo = _pg_reference(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.2, "sequence")
    assert out.loss.item() != pytest.approx(grpo[0], rel=1e-6)


def test_per_token_advantages_and_a_kl_term_match_the_loop() -> None:
    logps, old, _, mask = _batch(2)
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(logps.shape, generator=g, dtype=torch.float64)
    ref_logps = old + 0.3 * torch.randn(logps.shape, generator=g, dtype=torch.float64)
    kl = k3_kl(logps, ref_logps)
    out = clipped_policy_loss(logps, old, adv, mask, per_token_kl=kl, beta=0.04, aggregation="sequence")
    expected = _pg_reference(
        logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, "sequence", kl.tolist(), 0.04
    )
    assert out.loss.item() == pytest.approx(expected[0], rel=1e-12)
    active = [kl[i, t].item() for i in range(kl.shape[0]) for t in range(kl.shape[1]) if mask[i, t]]
    assert out.kl.item() == pytest.approx(sum(active) / len(active), rel=1e-12)


def test_gradient_flows_only_through_unclipped_tokens() -> None:
    logps, old, adv, mask = _batch(4)
    logps.requires_grad_()
    clipped_policy_loss(logps, old, adv, mask).loss.backward()
    n = int(mask.sum())
    for i in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            rho = math.exp(logps[i, t].item() - old[i, t].item())
            a = adv[i].item()
            bound = rho > 1.28 if a > 0 else rho < 0.8
            expected = 0.0 if (not mask[i, t] or bound) else -rho * a / n
            assert logps.grad[i, t].item() == pytest.approx(expected, rel=1e-10, abs=1e-15)


def test_on_policy_ratios_clip_nothing_and_give_minus_the_mean_advantage() -> None:
    # TRL num_iterations=1: old log-probs are the detached current ones, ρ ≡ 1 (huggingface/trl#3120)
    logps, _, adv, mask = _batch(5)
    out = clipped_policy_loss(logps, logps.detach(), adv, mask)
    assert out.clip_low.item() == 0.0 and out.clip_high.item() == 0.0
    weights = mask.sum(dim=1).double()
    assert out.loss.item() == pytest.approx(-(adv * weights).sum().item() / weights.sum().item(), rel=1e-12)


def test_bf16_inputs_compute_in_float32_close_to_float64() -> None:
    logps, old, adv, mask = (t.bfloat16() if t.is_floating_point() else t for t in _batch(6))
    out = clipped_policy_loss(logps, old, adv, mask)
    assert out.loss.dtype == torch.float32 and out.clip_low.dtype == torch.float32
    ref = _pg_reference(
        logps.double().tolist(), old.double().tolist(), adv.double().tolist(), mask.tolist(), 0.2, 0.28, "token"
    )
    assert out.loss.item() == pytest.approx(ref[0], rel=1e-5, abs=1e-6)


def test_all_masked_batch_gives_zero_and_masked_nan_does_not_leak() -> None:
    logps, old, adv, mask = _batch(7)
    none = torch.zeros_like(mask)
    out = clipped_policy_loss(logps, old, adv, none)
    assert (out.loss.item(), out.clip_low.item(), out.clip_high.item()) == (0.0, 0.0, 0.0)
    poisoned = logps.clone()
    poisoned[~mask] = float("nan")
    assert clipped_policy_loss(poisoned, old, adv, mask).loss.item() == pytest.approx(
        clipped_policy_loss(logps, old, adv, mask).loss.item(), rel=1e-12
    )


def test_nan_and_inf_in_active_tokens_propagate() -> None:
    logps, old, adv, mask = _batch(8)
    poisoned = logps.clone()
    poisoned[0, 0] = float("nan")
    assert torch.isnan(clipped_policy_loss(poisoned, old, adv, mask).loss)
    exploding = logps.clone()
    exploding[0, 0] = 1e4  # ρ = inf; with a negative advantage the surrogate is unbounded (no dual clip)
    negative = adv.clone()
    negative[0] = -1.0
    assert clipped_policy_loss(exploding, old, negative, mask).loss.item() == math.inf


def _pg_args(**changes):
    args = {"logps": torch.zeros(2, 3), "old_logps": torch.zeros(2, 3), "advantages": torch.zeros(2)}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"eps_high": 0.1}, r"eps_high=0.1; allowed: a finite number >= eps_low \(0.2\)"),
        ({"eps_high": float("nan")}, r"eps_high=nan"),
        ({"eps_high": math.inf}, r"eps_high=inf"),
        ({"eps_low": 1.0}, r"eps_low=1.0; allowed: a finite number in \[0.0, 1.0\)"),
        ({"eps_low": -0.1}, r"eps_low=-0.1"),
        ({"aggregation": "seq-mean"}, r"aggregation='seq-mean'; allowed: one of \('token', 'sequence'\)"),
        ({"logps": torch.zeros(6)}, r"logps.shape=\(6,\); allowed: a 2-d tensor"),
        ({"logps": torch.zeros(0, 3)}, r"logps.shape=\(0, 3\) is empty"),
        ({"old_logps": torch.zeros(2, 4)}, r"old_logps.shape=\(2, 4\); allowed: logps's shape \(2, 3\)"),
        ({"advantages": torch.zeros(3)}, r"advantages.shape=\(3,\); allowed: \(batch,\) = \(2,\) or logps's shape"),
        ({"advantages": torch.zeros(2, dtype=torch.long)}, r"advantages is a torch.int64 tensor"),
        ({"mask": torch.ones(2)}, r"mask.shape=\(2,\); allowed: logps's shape \(2, 3\)"),
        ({"beta": 0.1}, r"beta=0.1 needs per_token_kl"),
        ({"beta": -0.1, "per_token_kl": torch.zeros(2, 3)}, r"beta=-0.1"),
        ({"per_token_kl": torch.zeros(3, 2)}, r"per_token_kl.shape=\(3, 2\)"),
    ],
)
def test_clipped_policy_loss_hostile_inputs(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        clipped_policy_loss(**_pg_args(**changes))


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    spread=st.floats(0.0, 2.0),
)
def test_token_equals_sequence_with_equal_lengths_and_clip_fractions_lie_in_0_1(
    batch: int, tokens: int, seed: int, spread: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    old = -2 * torch.rand(batch, tokens, generator=g, dtype=torch.float64)
    logps = old + spread * torch.randn(batch, tokens, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    token = clipped_policy_loss(logps, old, adv, aggregation="token")
    sequence = clipped_policy_loss(logps, old, adv, aggregation="sequence")
    assert token.loss.item() == pytest.approx(sequence.loss.item(), rel=1e-9, abs=1e-12)
    for fraction in (token.clip_low, token.clip_high):
        assert 0.0 <= fraction.item() <= 1.0
    assert token.clip_low.item() + token.clip_high.item() <= 1.0


def _advantages_reference(rewards: list[float], group_size: int, eps: float) -> list[float]:
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out += [(r - mean) / (std + eps) for r in group]
    return out


def test_group_advantages_match_a_float64_loop_with_trls_unbiased_std_and_eps() -> None:
    g = torch.Generator().manual_seed(9)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    for size in (2, 3, 4, 6):
        got = group_advantages(rewards, size)
        assert got.tolist() == pytest.approx(_advantages_reference(rewards.tolist(), size, 1e-4), rel=1e-12)
    assert group_advantages(rewards, 4, eps=0.0).tolist() == pytest.approx(
        _advantages_reference(rewards.tolist(), 4, 0.0), rel=1e-12
    )


def test_group_advantages_bf16_and_nan_stay_in_their_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, float("nan"), 2.0, 1.0])
    got = group_advantages(rewards.bfloat16(), 3)
    assert got.dtype == torch.float32
    assert got[:3].tolist() == pytest.approx(_advantages_reference([1.0, 0.0, 0.5], 3, 1e-4), rel=1e-6)
    assert torch.isnan(got[3:]).all()


@settings(max_examples=80, deadline=None)
@given(
    groups=st.integers(1, 4),
    size=st.integers(2, 6),
    seed=st.integers(0, 2**16),
    shift=st.floats(-100, 100),
)
def test_group_advantages_sum_to_zero_and_ignore_a_shift(groups: int, size: int, seed: int, shift: float) -> None:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(groups * size, generator=g, dtype=torch.float64)
    adv = group_advantages(rewards, size)
    assert adv.view(groups, size).sum(dim=1).abs().max().item() < 1e-9
    assert (group_advantages(rewards + shift, size) - adv).abs().max().item() < 1e-6


def test_informative_groups_is_dapos_filter() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, float("nan"), 1.0, 1.0])
    assert informative_groups(rewards, 3).tolist() == [False, True, False, False]
    assert informative_groups(torch.tensor([0.0, 1e-30]), 2).tolist() == [True]


@pytest.mark.parametrize("fn", [group_advantages, informative_groups])
@pytest.mark.parametrize(
    ("rewards", "size", "match"),
    [
        (torch.zeros(4), 1, r"group_size=1; allowed: an int >= 2"),
        (torch.zeros(4), 2.0, r"group_size=2.0"),
        (torch.zeros(4), True, r"group_size=True"),
        (torch.zeros(5), 2, r"rewards.shape=\(5,\); allowed: a length divisible by group_size=2"),
        (torch.zeros(2, 2), 2, r"rewards.shape=\(2, 2\); allowed: a 1-d tensor"),
        (torch.zeros(0), 2, r"rewards.shape=\(0,\) is empty"),
        (torch.zeros(4, dtype=torch.int64), 2, r"rewards is a torch.int64 tensor"),
    ],
)
def test_group_functions_hostile_inputs(fn, rewards, size, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(rewards, size)


def test_group_advantages_rejects_a_bad_eps() -> None:
    with pytest.raises(ValueError, match=r"eps=-1.0"):
        group_advantages(torch.zeros(4), 2, eps=-1.0)


def test_k3_matches_a_float64_loop_and_verls_clamps() -> None:
    g = torch.Generator().manual_seed(10)
    logps = -4 * torch.rand(3, 5, generator=g, dtype=torch.float64)
    ref = -4 * torch.rand(3, 5, generator=g, dtype=torch.float64)
    got = k3_kl(logps, ref)
    for i in range(3):
        for t in range(5):
            d = ref[i, t].item() - logps[i, t].item()
            assert got[i, t].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-12, abs=1e-15)
    far = torch.tensor([-30.0, 30.0, -1.0], dtype=torch.float64)  # d = +30, −30, +1
    clamped = k3_kl(
        far, torch.zeros(3, dtype=torch.float64), log_ratio_clamp=VERL_LOG_RATIO_CLAMP, kl_clamp=VERL_KL_CLAMP
    )
    assert clamped.tolist() == pytest.approx([10.0, 10.0, math.e - 2], rel=1e-12)
    only_ratio = k3_kl(far, torch.zeros(3, dtype=torch.float64), log_ratio_clamp=20.0)
    assert only_ratio.tolist() == pytest.approx([math.exp(20) - 21, math.exp(-20) + 19, math.e - 2], rel=1e-12)


def test_k3_overflows_without_a_clamp_as_in_trl_and_stays_finite_with_verls() -> None:
    logps, ref = torch.tensor([-200.0]), torch.tensor([0.0])  # exp(200) overflows float32
    assert k3_kl(logps, ref).item() == math.inf
    assert k3_kl(logps, ref, log_ratio_clamp=20.0, kl_clamp=10.0).item() == 10.0
    assert torch.isnan(k3_kl(torch.tensor([float("nan")]), ref, log_ratio_clamp=20.0, kl_clamp=10.0))
    assert k3_kl(logps.bfloat16(), ref.bfloat16(), log_ratio_clamp=20.0).dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ref_logps": torch.zeros(3)}, r"ref_logps.shape=\(3,\); allowed: logps's shape \(2,\)"),
        ({"log_ratio_clamp": 0.0}, r"log_ratio_clamp=0.0; allowed: a finite number in \(0.0, inf\)"),
        ({"kl_clamp": float("nan")}, r"kl_clamp=nan"),
        ({"logps": torch.zeros(2, dtype=torch.long)}, r"logps is a torch.int64 tensor"),
    ],
)
def test_k3_hostile_inputs(kwargs: dict, match: str) -> None:
    args = {"logps": torch.zeros(2), "ref_logps": torch.zeros(2)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        k3_kl(**args)


@settings(max_examples=100, deadline=None)
@given(d=st.floats(-30, 30))
def test_k3_is_never_negative(d: float) -> None:
    assert k3_kl(torch.tensor([0.0], dtype=torch.float64), torch.tensor([d], dtype=torch.float64)).item() >= 0.0
