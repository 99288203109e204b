"""dpo_loss and chosen_sft_loss against float64 plain-Python references, their gradients, and hostile inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.losses import DPOLoss, chosen_sft_loss, dpo_loss


def _dpo_reference(c: list[float], r: list[float], rc: list[float], rr: list[float], beta: float) -> float:
    total = 0.0
    for i in range(len(c)):
        z = beta * ((c[i] - rc[i]) - (r[i] - rr[i]))
        # −log σ(z) = log(1 + e^{−z}), written stably for either sign
        total += math.log1p(math.exp(-z)) if z > 0 else -z + math.log1p(math.exp(z))
    return total / len(c)


def _pairs(seed: int, n: int = 6, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(-30 * torch.rand(n, generator=g, dtype=torch.float64) - 1).to(dtype) for _ in range(4)]


def test_dpo_loss_matches_a_float64_loop() -> None:
    c, r, rc, rr = _pairs(0)
    for beta in (0.1, 0.5, 2.0):
        out = dpo_loss(c, r, rc, rr, beta=beta)
        expected = _dpo_reference(c.tolist(), r.tolist(), rc.tolist(), rr.tolist(), beta)
        assert out.loss.dtype == torch.float64
        assert out.loss.item() == pytest.approx(expected, rel=1e-12)
        for i in range(len(c)):
            assert out.chosen_rewards[i].item() == pytest.approx(beta * (c[i].item() - rc[i].item()), rel=1e-12)
            assert out.rejected_rewards[i].item() == pytest.approx(beta * (r[i].item() - rr[i].item()), rel=1e-12)


def test_dpo_default_beta_is_trls_0_1_and_rewards_are_detached() -> None:
    c, r, rc, rr = _pairs(1)
    c.requires_grad_()
    out = dpo_loss(c, r, rc, rr)
    assert isinstance(out, DPOLoss)
    assert out.loss.item() == pytest.approx(_dpo_reference(c.tolist(), r.tolist(), rc.tolist(), rr.tolist(), 0.1))
    assert out.loss.requires_grad and not out.chosen_rewards.requires_grad


def test_dpo_gradient_is_minus_beta_sigmoid_of_minus_z_over_batch() -> None:
    c, r, rc, rr = _pairs(2)
    c.requires_grad_()
    r.requires_grad_()
    beta = 0.3
    dpo_loss(c, r, rc, rr, beta=beta).loss.backward()
    for i in range(len(c)):
        z = beta * ((c[i].item() - rc[i].item()) - (r[i].item() - rr[i].item()))
        expected = -beta / (1 + math.exp(z)) / len(c)
        assert c.grad[i].item() == pytest.approx(expected, rel=1e-10)
        assert r.grad[i].item() == pytest.approx(-expected, rel=1e-10)


def test_dpo_fresh_reference_gives_log_2_and_zero_rewards() -> None:
    logps = torch.tensor([-12.0, -3.5])
    out = dpo_loss(logps, logps - 1, logps, logps - 1)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert out.chosen_rewards.abs().max().item() == 0.0


def test_dpo_huge_margins_stay_finite() -> None:
    zero = torch.zeros(1)
    assert dpo_loss(torch.tensor([-1e4]), zero, zero, zero, beta=0.1).loss.item() == pytest.approx(1000.0)
    assert dpo_loss(torch.tensor([1e4]), zero, zero, zero, beta=0.1).loss.item() == 0.0


def test_dpo_bf16_inputs_compute_in_float32_within_bf16_rounding_of_the_float64_answer() -> None:
    c, r, rc, rr = _pairs(3, dtype=torch.bfloat16)
    out = dpo_loss(c, r, rc, rr, beta=0.5)
    assert out.loss.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    # the reference sees the same bf16-rounded values: only the arithmetic precision differs
    expected = _dpo_reference(*(t.double().tolist() for t in (c, r, rc, rr)), 0.5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_nan_and_inf_inputs_propagate_to_the_loss() -> None:
    ok = torch.tensor([-1.0, -2.0])
    assert torch.isnan(dpo_loss(torch.tensor([float("nan"), -1.0]), ok, ok, ok).loss)
    # log π(y⁻) = −inf (probability 0) is a valid input: the pair's loss is 0
    out = dpo_loss(ok, torch.tensor([float("-inf"), -2.0]), ok, ok)
    assert out.loss.item() == pytest.approx(math.log(2) / 2, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chosen_logps": torch.zeros(2, 1)}, r"chosen_logps.shape=\(2, 1\); allowed: a 1-d tensor"),
        ({"rejected_logps": torch.zeros(3)}, r"rejected_logps.shape=\(3,\); allowed: chosen_logps's shape \(2,\)"),
        ({"ref_chosen_logps": torch.zeros(2, dtype=torch.long)}, r"ref_chosen_logps is a torch.int64 tensor"),
        ({"ref_rejected_logps": [0.0, 0.0]}, r"ref_rejected_logps is list; allowed: a floating-point tensor"),
        ({"chosen_logps": torch.zeros(0), "rejected_logps": torch.zeros(0)}, r"chosen_logps.shape=\(0,\) is empty"),
        ({"beta": 0.0}, r"beta=0.0; allowed: a finite number in \(0.0, inf\)"),
        ({"beta": float("nan")}, r"beta=nan"),
        ({"beta": "0.1"}, r"beta='0.1'"),
        ({"beta": True}, r"beta=True"),
    ],
)
def test_dpo_hostile_inputs_get_one_clear_value_error(kwargs: dict, match: str) -> None:
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    args = {name: torch.zeros(2) for name in names}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dpo_loss(**args)


@settings(max_examples=100, deadline=None)
@given(
    z=st.floats(-50, 50, allow_nan=False),
    beta=st.floats(0.01, 5.0),
)
def test_dpo_swapping_chosen_and_rejected_shifts_the_loss_by_minus_beta_z(z: float, beta: float) -> None:
    # −log σ(x) − (−log σ(−x)) = −x: the loss is a softplus of −β·margin
    zero = torch.zeros(1, dtype=torch.float64)
    margin = torch.tensor([z], dtype=torch.float64)
    forward = dpo_loss(margin, zero, zero, zero, beta=beta).loss.item()
    swapped = dpo_loss(zero, margin, zero, zero, beta=beta).loss.item()
    assert forward >= 0.0 and swapped >= 0.0
    assert forward - swapped == pytest.approx(-beta * z, abs=1e-9)


def _sft_reference(logps: list[list[float]], mask: list[list[bool]], alpha: float, aggregation: str) -> float:
    if aggregation == "token":
        total, count = 0.0, 0
        for row, keep in zip(logps, mask, strict=True):
            for value, k in zip(row, keep, strict=True):
                if k:
                    total, count = total - value, count + 1
        return alpha * total / max(count, 1)
    means = []
    for row, keep in zip(logps, mask, strict=True):
        picked = [-v for v, k in zip(row, keep, strict=True) if k]
        means.append(sum(picked) / max(len(picked), 1))
    return alpha * sum(means) / len(means)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_chosen_sft_loss_matches_a_float64_loop(aggregation: str) -> None:
    g = torch.Generator().manual_seed(4)
    logps = -5 * torch.rand(4, 7, generator=g, dtype=torch.float64)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[t < n for t in range(7)] for n in lengths])
    got = chosen_sft_loss(logps, mask, alpha=0.7, aggregation=aggregation)
    assert got.item() == pytest.approx(_sft_reference(logps.tolist(), mask.tolist(), 0.7, aggregation), rel=1e-12)


def test_chosen_sft_loss_default_is_trls_token_mean_with_alpha_1() -> None:
    logps = torch.tensor([[-1.0, -3.0], [-2.0, -9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])  # 0/1 numbers work like bools
    assert chosen_sft_loss(logps, mask).item() == pytest.approx(2.0)
    assert chosen_sft_loss(logps).item() == pytest.approx(15.0 / 4)


def test_chosen_sft_loss_ignores_nan_padding_and_an_empty_mask_gives_zero() -> None:
    logps = torch.tensor([[-1.0, float("nan")], [-2.0, float("-inf")]])
    mask = torch.tensor([[True, False], [True, False]])
    assert chosen_sft_loss(logps, mask).item() == pytest.approx(1.5)
    assert chosen_sft_loss(logps, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    assert torch.isnan(chosen_sft_loss(logps))  # unmasked NaN propagates


def test_chosen_sft_loss_bf16_computes_in_float32() -> None:
    g = torch.Generator().manual_seed(5)
    logps = (-8 * torch.rand(3, 50, generator=g)).bfloat16()
    got = chosen_sft_loss(logps, alpha=0.5)
    assert got.dtype == torch.float32
    expected = _sft_reference(logps.double().tolist(), [[True] * 50] * 3, 0.5, "token")
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(3),), {}, r"chosen_token_logps.shape=\(3,\); allowed: a 2-d tensor"),
        ((torch.zeros(0, 4),), {}, r"is empty"),
        ((torch.zeros(2, 3), torch.ones(3, 2)), {}, r"mask.shape=\(3, 2\); allowed: chosen_token_logps's shape"),
        ((torch.zeros(2, 3), [[1, 1, 1]]), {}, r"mask is list"),
        ((torch.zeros(2, 3),), {"alpha": -1.0}, r"alpha=-1.0; allowed: a finite number in \[0.0, inf\)"),
        ((torch.zeros(2, 3),), {"aggregation": "mean"}, r"aggregation='mean'; allowed: one of \('token', 'sequence'\)"),
    ],
)
def test_chosen_sft_loss_hostile_inputs(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        chosen_sft_loss(*args, **kwargs)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 4), length=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_chosen_sft_token_and_sequence_agree_when_all_lengths_are_equal(batch: int, length: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    token = chosen_sft_loss(logps, aggregation="token").item()
    assert chosen_sft_loss(logps, aggregation="sequence").item() == pytest.approx(token, rel=1e-12)
