"""policy_signals and reward_ensemble_signals: rl/… and rm/… keys against float64 hand computations, NaN/Inf,
bad input, no host read."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel.signals import policy_signals, reward_ensemble_signals
from tests.signals.test_probe_host_copies import HostToDevice

B, T, V = 4, 5, 7


def batch(seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False  # responses of 3, 5, 4, 1 tokens
    mask[2, 4:] = False
    mask[3, 1:] = False
    return {
        "mask": mask,
        "logits": torch.randn(B, T, V, generator=g, dtype=dtype) * 2,
        "logps": logps,
        "ref_logps": logps + torch.randn(B, T, generator=g, dtype=dtype) * 0.5,
        "old_logps": logps + torch.randn(B, T, generator=g, dtype=dtype) * 0.3,
        "advantages": torch.tensor([1.5, -0.5, -1.0, 0.25], dtype=dtype),
    }


def np_reference(b: dict[str, torch.Tensor], eps_low: float, eps_high: float) -> dict[str, float]:
    """The token statistics written out in float64 NumPy, one token at a time."""
    m = b["mask"].numpy()
    z = b["logits"].double().numpy()
    lp, ref, old = (b[k].double().numpy() for k in ("logps", "ref_logps", "old_logps"))
    adv = b["advantages"].double().numpy()
    entropies, k3, low, high = [], [], [], []
    for i in range(B):
        for t in range(T):
            if not m[i, t]:
                continue
            p = np.exp(z[i, t] - z[i, t].max())
            p /= p.sum()
            entropies.append(-(p * np.log(p)).sum())
            d = ref[i, t] - lp[i, t]
            k3.append(math.exp(d) - d - 1)
            rho = math.exp(lp[i, t] - old[i, t])
            low.append(rho < 1 - eps_low and adv[i] < 0)
            high.append(rho > 1 + eps_high and adv[i] > 0)
    return {
        keys.RL_ENTROPY: float(np.mean(entropies)),
        keys.RL_KL: float(np.mean(k3)),
        keys.RL_CLIP_LOW: float(np.mean(low)),
        keys.RL_CLIP_HIGH: float(np.mean(high)),
        keys.RL_ADVANTAGE_MEAN: float(adv.mean()),
        keys.RL_ADVANTAGE_STD: float(adv.std(ddof=1)),
        keys.RL_LENGTH_MEAN: float(m.sum(1).mean()),
        keys.RL_LENGTH_MAX: float(m.sum(1).max()),
    }


def values(out: dict[str, torch.Tensor]) -> dict[str, float]:
    assert all(v.shape == () and not v.requires_grad for v in out.values())
    return {k: v.item() for k, v in out.items()}


@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, None), (0.2, 0.28), (0.05, 0.05)])
def test_token_statistics_match_the_float64_hand_computation(eps_low, eps_high):
    b = batch()
    got = values(policy_signals(**b, epsilon_low=eps_low, epsilon_high=eps_high))
    expected = np_reference(b, eps_low, eps_high if eps_high is not None else eps_low)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_float32_and_bf16_inputs_are_measured_in_float32():
    b = {k: v.float() if v.is_floating_point() else v for k, v in batch().items()}
    expected = np_reference(batch(), 0.2, 0.2)
    got = policy_signals(**b)
    assert got[keys.RL_ENTROPY].dtype == torch.float32
    assert got[keys.RL_ENTROPY].item() == pytest.approx(expected[keys.RL_ENTROPY], rel=1e-5)
    half = policy_signals(entropies=torch.ones(2, 3, dtype=torch.bfloat16))
    assert half[keys.RL_ENTROPY].dtype == torch.float32


def test_given_entropies_are_read_as_given_and_masked_positions_never_enter():
    entropies = torch.tensor([[1.0, 2.0, math.nan], [3.0, math.inf, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert values(policy_signals(entropies=entropies, mask=mask))[keys.RL_ENTROPY] == pytest.approx(11 / 4)


def test_per_token_advantages_use_the_response_tokens():
    adv = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    got = values(policy_signals(advantages=adv, mask=torch.tensor([[1, 1, 0], [1, 1, 0]])))
    assert got[keys.RL_ADVANTAGE_MEAN] == 2.5
    assert got[keys.RL_ADVANTAGE_STD] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))


def test_one_pass_per_batch_clips_nothing():
    # num_iterations=1: the sampling policy is the current one, ρ ≡ 1 (trl#3120)
    b = batch()
    got = values(policy_signals(logps=b["logps"], old_logps=b["logps"].clone(), advantages=b["advantages"]))
    assert got[keys.RL_CLIP_LOW] == 0.0 and got[keys.RL_CLIP_HIGH] == 0.0


def test_rewards_groups_lengths_and_truncation():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    got = values(policy_signals(rewards=rewards, group_size=3, lengths=torch.tensor([8, 3, 8, 5]), max_length=8))
    assert got[keys.RL_REWARD_MEAN] == pytest.approx(rewards.numpy().mean(), rel=1e-15)
    assert got[keys.RL_REWARD_STD] == pytest.approx(rewards.numpy().std(ddof=1), rel=1e-15)
    assert got[keys.RL_ZERO_STD_GROUPS] == pytest.approx(2 / 3)  # groups 1 and 3 are uniform
    assert got[keys.RL_LENGTH_MEAN] == 6.0 and got[keys.RL_LENGTH_MAX] == 8.0 and got[keys.RL_TRUNCATED] == 0.5
    cut = values(policy_signals(lengths=torch.tensor([8, 3]), truncated=torch.tensor([False, True])))
    assert cut[keys.RL_TRUNCATED] == 0.5  # the loop's own flag wins over the length rule


def test_the_mask_gives_the_lengths():
    got = values(policy_signals(mask=batch()["mask"], max_length=5))
    assert (got[keys.RL_LENGTH_MEAN], got[keys.RL_LENGTH_MAX], got[keys.RL_TRUNCATED]) == (13 / 4, 5.0, 0.25)


def test_nan_and_inf_reach_the_signals_they_enter():
    b = batch()
    b["ref_logps"][1, 0] = b["logps"][1, 0] + 200.0  # the k3 overflow of trl#3015 (float32)
    b["old_logps"][2, 1] = math.nan
    got = values(policy_signals(**{k: v.float() if v.is_floating_point() else v for k, v in b.items()}))
    assert got[keys.RL_KL] == math.inf
    assert math.isnan(got[keys.RL_CLIP_LOW]) and math.isnan(got[keys.RL_CLIP_HIGH])  # not a token that "didn't clip"
    assert math.isfinite(got[keys.RL_ENTROPY])
    r = values(policy_signals(rewards=torch.tensor([1.0, math.nan, 0.0, 0.0]), group_size=2))
    assert math.isnan(r[keys.RL_REWARD_MEAN]) and math.isnan(r[keys.RL_ZERO_STD_GROUPS])
    one = values(policy_signals(rewards=torch.tensor([2.0])))
    assert one[keys.RL_REWARD_MEAN] == 2.0 and math.isnan(one[keys.RL_REWARD_STD])
    empty = values(policy_signals(entropies=torch.ones(2, 3), mask=torch.zeros(2, 3)))
    assert math.isnan(empty[keys.RL_ENTROPY])


def test_masked_vocabulary_entries_do_not_make_the_entropy_nan():
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]])
    assert values(policy_signals(logits=logits))[keys.RL_ENTROPY] == pytest.approx(math.log(2))


M2 = torch.zeros(2, 3)
BAD = [
    ({}, r"nothing to measure"),
    ({"logits": torch.zeros(2, 3, 4), "entropies": M2}, r"logits and entropies are both given"),
    ({"logits": torch.zeros(2, 3)}, r"logits=a torch.float32 tensor of shape \(2, 3\); allowed: a 3-d floating"),
    ({"entropies": torch.zeros(2, 3, dtype=torch.long)}, r"entropies=a torch.int64 .* 2-d floating"),
    ({"entropies": M2, "mask": torch.ones(2, 4)}, r"different \(B, T\).*entropies \(2, 3\).*mask \(2, 4\)"),
    ({"ref_logps": M2}, r"ref_logps without logps"),
    ({"old_logps": M2}, r"old_logps without logps"),
    ({"logps": M2, "advantages": torch.zeros(3)}, r"advantages of shape \(3,\).*allowed: \(2,\) or \(2, 3\)"),
    ({"advantages": torch.zeros(2, 3, 1)}, r"advantages=.*1-d or 2-d floating"),
    ({"logps": M2, "epsilon_low": 1.0}, r"epsilon_low=1.0; allowed: a number in \(0, 1\)"),
    ({"logps": M2, "epsilon_low": True}, r"epsilon_low=True"),
    ({"logps": M2, "epsilon_high": -0.1}, r"epsilon_high=-0.1"),
    ({"logps": M2, "epsilon_high": math.inf}, r"epsilon_high=inf"),
    ({"rewards": torch.zeros(2, 2)}, r"rewards=.*\(2, 2\); allowed: a 1-d floating"),
    ({"rewards": torch.zeros(6), "group_size": 4}, r"group_size=4 with 6 rewards; allowed: an int >= 2 that divides"),
    ({"rewards": torch.zeros(6), "group_size": 1}, r"group_size=1"),
    ({"rewards": torch.zeros(6), "group_size": 2.0}, r"group_size=2.0"),
    ({"group_size": 2}, r"group_size=2 without rewards"),
    ({"lengths": torch.zeros(2, 2)}, r"lengths=.*1-d real or bool"),
    ({"lengths": torch.ones(3), "max_length": 0}, r"max_length=0; allowed: an int >= 1"),
    ({"max_length": 8}, r"max_length without lengths or mask"),
    ({"lengths": torch.ones(3), "truncated": torch.ones(2)}, r"truncated of shape \(2,\), lengths \(3,\)"),
    ({"rewards": [1.0, 2.0]}, r"rewards=\[1.0, 2.0\]"),
]


@pytest.mark.parametrize(("bad", "message"), BAD)
def test_bad_input_gets_one_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        policy_signals(**bad)


def test_reward_ensemble_matches_the_float64_hand_computation():
    r = torch.tensor([[1.0, 2.0, 0.5], [3.0, 2.0, -0.5], [2.0, 5.0, 0.0]], dtype=torch.float64)
    got = values(reward_ensemble_signals(r))
    a = r.numpy()
    members = {keys.per_param(keys.RM_REWARD_PER_MEMBER, str(i)): a[i].mean() for i in range(3)}
    expected = {**members, keys.RM_MEAN: a.mean(), keys.RM_DISAGREEMENT: a.std(axis=0, ddof=1).mean()}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-15), key


def test_reward_ensemble_nan_and_bad_shapes():
    got = values(reward_ensemble_signals(torch.tensor([[1.0, math.nan], [2.0, 2.0]])))
    assert math.isnan(got[keys.RM_DISAGREEMENT]) and got[keys.per_param(keys.RM_REWARD_PER_MEMBER, "1")] == 2.0
    for bad, message in [
        (torch.zeros(1, 4), r"\(1, 4\); allowed: \(members, batch\) with members >= 2"),
        (torch.zeros(3, 0), r"\(3, 0\)"),
        (torch.zeros(3), r"rewards=.*\(3,\); allowed: a 2-d floating"),
        (torch.zeros(2, 2, dtype=torch.long), r"torch.int64"),
    ]:
        with pytest.raises(ValueError, match=message):
            reward_ensemble_signals(bad)


def test_ensemble_signals_go_through_guard_step_signals():
    # per-member values are separate 0-d keys: the form Guard.step(signals=...) accepts
    from keel.guard.user_signals import split_signals

    on_device, on_host = split_signals(reward_ensemble_signals(torch.ones(3, 2)), torch.device("cpu"))
    assert len(on_device) == 5 and on_host == {}


def test_no_host_read_and_no_host_to_device_copy():
    b = {k: v.to("meta") for k, v in batch(dtype=torch.float32).items()}
    with HostToDevice() as mode:
        out = policy_signals(
            **b,
            epsilon_high=0.28,
            rewards=torch.zeros(8, device="meta"),
            group_size=4,
            max_length=5,
        )
        out.update(reward_ensemble_signals(torch.zeros(3, 4, device="meta")))
    assert mode.copies == []
    assert len(out) == 12 + 5 and all(v.device.type == "meta" for v in out.values())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps_low=st.floats(0.01, 0.5), eps_high=st.floats(0.01, 1.0))
def test_matches_the_float64_reference_on_random_batches(seed, eps_low, eps_high):
    b = batch(seed)
    b["mask"] = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.7
    b["mask"][:, 0] = True  # every response has a token
    got = values(policy_signals(**b, epsilon_low=eps_low, epsilon_high=eps_high))
    for key, value in np_reference(b, eps_low, eps_high).items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
