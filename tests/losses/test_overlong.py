"""soft_overlong_punishment against DAPO Eq. 13 written out per length, and against TRL's reward function."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.losses import DAPO_CACHE_LENGTH, DAPO_MAX_LENGTH, soft_overlong_punishment


def _eq13(length: int, max_length: int, cache_length: int) -> float:
    if length <= max_length - cache_length:
        return 0.0
    if length <= max_length:
        return ((max_length - cache_length) - length) / cache_length
    return -1.0


LENGTHS = [0, 1, 50, 79, 80, 81, 90, 99, 100, 101, 250]
SETTINGS = [(100, 20), (100, 0), (100, 100), (100, 1), (1, 1), (7, 3)]


@pytest.mark.parametrize(("max_length", "cache_length"), SETTINGS)
def test_matches_eq_13_in_float64(max_length: int, cache_length: int) -> None:
    got = soft_overlong_punishment(LENGTHS, max_length=max_length, cache_length=cache_length, dtype=torch.float64)
    assert got.tolist() == [_eq13(n, max_length, cache_length) for n in LENGTHS]


@pytest.mark.parametrize(("max_length", "cache_length"), SETTINGS)
def test_equals_trls_get_soft_overlong_punishment(max_length: int, cache_length: int) -> None:
    rewards = pytest.importorskip("trl.rewards", reason="trl is not installed (keel[trl])")
    trl_fn = rewards.get_soft_overlong_punishment(max_length, cache_length)
    expected = trl_fn([[1] * n for n in LENGTHS])
    got = soft_overlong_punishment(LENGTHS, max_length=max_length, cache_length=cache_length, dtype=torch.float64)
    assert got.tolist() == expected


def test_dapo_settings_and_tensor_lengths() -> None:
    lengths = torch.tensor([16384, 18432, 20480, 20481])
    got = soft_overlong_punishment(lengths, max_length=DAPO_MAX_LENGTH, cache_length=DAPO_CACHE_LENGTH)
    assert got.dtype == torch.float32
    assert got.tolist() == [0.0, -0.5, -1.0, -1.0]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    from_mask = soft_overlong_punishment(mask.sum(-1), max_length=4, cache_length=2)
    assert from_mask.tolist() == [-0.5, -1.0]
    assert soft_overlong_punishment(torch.tensor([3.0, 4.0]), max_length=4, cache_length=2).tolist() == [-0.5, -1.0]
    assert soft_overlong_punishment([], max_length=4, cache_length=2).shape == (0,)


@pytest.mark.parametrize(
    ("lengths", "kwargs", "match"),
    [
        ([10], {"max_length": 10, "cache_length": 11}, r"cache_length=11; allowed: an int in \[0, max_length=10\]"),
        ([10], {"max_length": 10, "cache_length": -1}, r"cache_length=-1"),
        ([10], {"max_length": 0, "cache_length": 0}, r"max_length=0; allowed: an int >= 1"),
        ([10], {"max_length": 10.0, "cache_length": 2}, r"max_length=10.0"),
        ([10], {"max_length": 10, "cache_length": 2, "dtype": torch.int64}, r"dtype=torch.int64"),
        ([-1, 3], {"max_length": 10, "cache_length": 2}, r"lengths contains -1; allowed: lengths >= 0"),
        ([1.5], {"max_length": 10, "cache_length": 2}, r"lengths=\[1.5\]; allowed: a sequence of ints"),
        (torch.tensor([2.5]), {"max_length": 10, "cache_length": 2}, r"lengths contains 2.5; allowed: whole numbers"),
        (torch.tensor([float("nan")]), {"max_length": 10, "cache_length": 2}, r"lengths contains nan"),
        (torch.tensor([float("inf")]), {"max_length": 10, "cache_length": 2}, r"lengths contains inf"),
        (torch.ones(2, 2), {"max_length": 10, "cache_length": 2}, r"shape \(2, 2\); allowed: 1-d integers"),
        ("abc", {"max_length": 10, "cache_length": 2}, r"lengths is str"),
    ],
)
def test_hostile_inputs(lengths, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        soft_overlong_punishment(lengths, **kwargs)


@settings(max_examples=100, deadline=None)
@given(
    max_length=st.integers(1, 5000),
    fraction=st.floats(0, 1),
    lengths=st.lists(st.integers(0, 10000), min_size=1, max_size=20),
)
def test_penalty_is_in_minus_1_0_and_never_rewards_a_longer_response(
    max_length: int, fraction: float, lengths: list[int]
) -> None:
    cache_length = int(fraction * max_length)
    ordered = sorted(lengths)
    got = soft_overlong_punishment(ordered, max_length=max_length, cache_length=cache_length, dtype=torch.float64)
    assert got.min().item() >= -1.0 and got.max().item() <= 0.0
    assert (got[1:] <= got[:-1]).all()
