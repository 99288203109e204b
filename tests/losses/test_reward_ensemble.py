"""ensemble_reward against per-sample float64 loops over members, its properties and hostile inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.losses import COSTE_PPO_UWO_LAMBDA, ensemble_reward


def _reference(columns: list[list[float]], objective: str, lam: float, unbiased: bool, w: float, std=None):
    out = []
    for j, column in enumerate(columns):  # one sample's rewards over the members
        k = len(column)
        mean = sum(column) / k
        worst = min(column)
        if objective == "mean":
            out.append(mean)
        elif objective == "wco":
            out.append(worst)
        elif objective == "uwo":
            var = sum((r - mean) ** 2 for r in column) / (k - 1 if unbiased else k)
            out.append(mean - lam * var)
        else:
            nominal = mean
            if std is not None:
                best = min(range(k), key=lambda i: std[j][i])
                nominal = column[best]
            out.append(w * nominal + (1 - w) * worst)
    return out


def _rewards(seed: int, members: int = 5, batch: int = 7, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(members, batch, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("objective", ["mean", "wco", "uwo", "robust"])
@pytest.mark.parametrize(("lam", "unbiased", "w"), [(0.1, True, 0.5), (0.5, False, 0.8), (2.0, True, 0.0)])
def test_every_objective_matches_a_float64_loop(objective: str, lam: float, unbiased: bool, w: float) -> None:
    rewards = _rewards(0)
    got = ensemble_reward(rewards, objective, uwo_lambda=lam, unbiased=unbiased, nominal_weight=w)
    expected = _reference(rewards.T.tolist(), objective, lam, unbiased, w)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_defaults_are_mean_and_coste_et_als_ppo_uwo() -> None:
    rewards = _rewards(1)
    assert ensemble_reward(rewards).tolist() == pytest.approx(_reference(rewards.T.tolist(), "mean", 0, True, 0))
    assert COSTE_PPO_UWO_LAMBDA == 0.1
    assert ensemble_reward(rewards, "uwo").tolist() == pytest.approx(
        _reference(rewards.T.tolist(), "uwo", 0.1, True, 0), rel=1e-12
    )


def test_robust_nominal_is_the_most_confident_member_when_stds_are_given() -> None:
    rewards = _rewards(2)
    g = torch.Generator().manual_seed(3)
    std = torch.rand(rewards.shape, generator=g, dtype=torch.float64)
    got = ensemble_reward(rewards, "robust", nominal_weight=0.7, member_std=std)
    assert got.tolist() == pytest.approx(_reference(rewards.T.tolist(), "robust", 0, True, 0.7, std.T.tolist()))


def test_robust_endpoints_are_the_nominal_reward_and_wco() -> None:
    rewards = _rewards(4)
    assert torch.equal(ensemble_reward(rewards, "robust", nominal_weight=0.0), ensemble_reward(rewards, "wco"))
    assert torch.allclose(ensemble_reward(rewards, "robust", nominal_weight=1.0), ensemble_reward(rewards, "mean"))


def test_one_member_gives_that_member_for_every_objective_but_unbiased_uwo() -> None:
    one = _rewards(5, members=1)
    for objective in ("mean", "wco", "robust"):
        assert torch.equal(ensemble_reward(one, objective), one[0])
    assert torch.equal(ensemble_reward(one, "uwo", unbiased=False), one[0])
    with pytest.raises(ValueError, match=r"1 member; allowed for objective='uwo' with unbiased=True: at least 2"):
        ensemble_reward(one, "uwo")


def test_bf16_members_compute_in_float32() -> None:
    rewards = _rewards(6, dtype=torch.bfloat16)
    for objective in ("mean", "uwo"):
        got = ensemble_reward(rewards, objective)
        assert got.dtype == torch.float32
        expected = _reference(rewards.double().T.tolist(), objective, 0.1, True, 0.5)
        assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_nan_and_inf_rewards_propagate_into_their_sample_only() -> None:
    rewards = torch.tensor([[1.0, float("nan"), 2.0], [0.5, 1.0, float("inf")]])
    for objective in ("mean", "wco", "uwo", "robust"):
        got = ensemble_reward(rewards, objective)
        assert math.isnan(got[1].item()), objective
        assert math.isfinite(got[0].item()), objective
    assert ensemble_reward(rewards, "wco")[2].item() == 2.0
    assert ensemble_reward(rewards, "mean")[2].item() == math.inf


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(2, 3), "WCO"), {}, r"objective='WCO'; allowed: one of \('mean', 'wco', 'uwo', 'robust'\)"),
        ((torch.zeros(2, 3), "max"), {}, r"objective='max'"),
        ((torch.zeros(3),), {}, r"rewards.shape=\(3,\); allowed: a 2-d tensor"),
        ((torch.zeros(2, 0),), {}, r"rewards.shape=\(2, 0\) is empty"),
        ((torch.zeros(0, 3),), {}, r"rewards.shape=\(0, 3\) is empty"),
        ((torch.zeros(2, 3, dtype=torch.int64),), {}, r"rewards is a torch.int64 tensor"),
        (([[1.0, 2.0]],), {}, r"rewards is list"),
        (
            (torch.zeros(2, 3), "uwo"),
            {"uwo_lambda": -0.1},
            r"uwo_lambda=-0.1; allowed: a finite number in \[0.0, inf\)",
        ),
        ((torch.zeros(2, 3), "uwo"), {"unbiased": 1}, r"unbiased=1; allowed: True"),
        (
            (torch.zeros(2, 3), "robust"),
            {"nominal_weight": 1.5},
            r"nominal_weight=1.5; allowed: a finite number in \[0.0, 1.0\]",
        ),
        ((torch.zeros(2, 3), "robust"), {"member_std": torch.zeros(3, 2)}, r"member_std.shape=\(3, 2\)"),
        ((torch.zeros(2, 3), "mean"), {"member_std": torch.zeros(2, 3)}, r"member_std given with objective='mean'"),
    ],
)
def test_hostile_inputs(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ensemble_reward(*args, **kwargs)


@settings(max_examples=100, deadline=None)
@given(
    members=st.integers(2, 6),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    lam=st.floats(0, 3),
    w=st.floats(0, 1),
)
def test_conservative_objectives_never_exceed_the_mean(members: int, batch: int, seed: int, lam: float, w: float):
    rewards = _rewards(seed, members, batch)
    mean = ensemble_reward(rewards, "mean")
    tolerance = 1e-12
    assert (ensemble_reward(rewards, "wco") <= mean + tolerance).all()
    assert (ensemble_reward(rewards, "uwo", uwo_lambda=lam) <= mean + tolerance).all()
    assert (ensemble_reward(rewards, "robust", nominal_weight=w) <= mean + tolerance).all()


@settings(max_examples=60, deadline=None)
@given(members=st.integers(2, 6), values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=5))
def test_when_members_agree_every_objective_is_the_shared_reward(members: int, values: list[float]) -> None:
    rewards = torch.tensor([values] * members, dtype=torch.float64)
    for objective in ("mean", "wco", "uwo", "robust"):
        assert ensemble_reward(rewards, objective).tolist() == pytest.approx(values, rel=1e-12, abs=1e-12)
