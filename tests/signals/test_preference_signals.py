"""preference_signals: the pref/… keys against a float64 hand computation, NaN/Inf, bad input, no host read."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel.signals import preference_signals
from tests.signals.test_probe_host_copies import HostToDevice

PAIRS = {  # four pairs: log-probabilities summed over tokens, reference, token counts
    "chosen": [-10.0, -12.5, -30.0, -7.25],
    "rejected": [-14.0, -11.0, -29.0, -20.0],
    "ref_chosen": [-11.0, -12.0, -28.0, -7.0],
    "ref_rejected": [-13.0, -12.0, -30.0, -19.0],
    "chosen_tokens": [5, 10, 12, 4],
    "rejected_tokens": [7, 9, 12, 8],
}


def reference(p: dict[str, list[float]], beta: float) -> dict[str, float]:
    """The same statistics in float64 NumPy, written out from their definitions."""
    c, r, rc, rr = (np.array(p[k], dtype=np.float64) for k in ("chosen", "rejected", "ref_chosen", "ref_rejected"))
    nc, nr = np.array(p["chosen_tokens"], np.float64), np.array(p["rejected_tokens"], np.float64)
    reward_c, reward_r = beta * (c - rc), beta * (r - rr)
    return {
        keys.PREF_CHOSEN_LOGP: c.mean(),
        keys.PREF_REJECTED_LOGP: r.mean(),
        keys.PREF_CHOSEN_LOGP_TOKEN: (c / nc).mean(),
        keys.PREF_REJECTED_LOGP_TOKEN: (r / nr).mean(),
        keys.PREF_CHOSEN_REWARD: reward_c.mean(),
        keys.PREF_REJECTED_REWARD: reward_r.mean(),
        keys.PREF_MARGIN: (reward_c - reward_r).mean(),
        keys.PREF_ACCURACY: (reward_c > reward_r).mean(),
        keys.PREF_CHOSEN_DISPLACEMENT: ((c - rc) / nc).mean(),
    }


def measure(p: dict[str, list[float]], beta: float = 0.1, dtype=torch.float32, **overrides) -> dict[str, float]:
    t = {k: torch.tensor(v, dtype=dtype if "tokens" not in k else torch.long) for k, v in p.items()}
    kwargs = dict(
        ref_chosen_logps=t["ref_chosen"],
        ref_rejected_logps=t["ref_rejected"],
        beta=beta,
        chosen_tokens=t["chosen_tokens"],
        rejected_tokens=t["rejected_tokens"],
    )
    kwargs.update(overrides)
    out = preference_signals(t["chosen"], t["rejected"], **kwargs)
    assert all(v.shape == () and not v.requires_grad for v in out.values())
    return {k: v.item() for k, v in out.items()}


def test_every_key_matches_the_float64_hand_computation():
    expected = reference(PAIRS, beta=0.1)
    got = measure(PAIRS, beta=0.1)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    # the worked numbers: rewards chosen 0.1·(1, −0.5, −2, −0.25) → −0.4375; pairs 1 and 4 are right → accuracy 0.5
    assert got[keys.PREF_CHOSEN_REWARD] == pytest.approx(-0.04375)
    assert got[keys.PREF_ACCURACY] == 0.5


def test_float64_inputs_stay_float64():
    out = measure(PAIRS, dtype=torch.float64)
    assert out[keys.PREF_MARGIN] == pytest.approx(reference(PAIRS, 0.1)[keys.PREF_MARGIN], rel=1e-15)
    c = torch.tensor(PAIRS["chosen"], dtype=torch.float64)
    assert preference_signals(c, c)[keys.PREF_CHOSEN_LOGP].dtype == torch.float64


def test_bf16_inputs_are_measured_in_float32():
    c = torch.tensor(PAIRS["chosen"], dtype=torch.bfloat16)
    out = preference_signals(c, c, ref_chosen_logps=c, ref_rejected_logps=c)
    assert out[keys.PREF_CHOSEN_LOGP].dtype == torch.float32
    assert out[keys.PREF_MARGIN].item() == 0.0


def test_keys_appear_only_when_their_inputs_are_given():
    c, r = torch.tensor(PAIRS["chosen"]), torch.tensor(PAIRS["rejected"])
    assert set(preference_signals(c, r)) == {keys.PREF_CHOSEN_LOGP, keys.PREF_REJECTED_LOGP}
    n = torch.tensor(PAIRS["chosen_tokens"])
    assert set(preference_signals(c, r, chosen_tokens=n)) == {
        keys.PREF_CHOSEN_LOGP,
        keys.PREF_REJECTED_LOGP,
        keys.PREF_CHOSEN_LOGP_TOKEN,
    }


def test_displacement_without_token_counts_is_per_sequence():
    got = measure(PAIRS, chosen_tokens=None)
    c, rc = np.array(PAIRS["chosen"]), np.array(PAIRS["ref_chosen"])
    assert got[keys.PREF_CHOSEN_DISPLACEMENT] == pytest.approx((c - rc).mean())
    assert keys.PREF_CHOSEN_LOGP_TOKEN not in got


def test_a_fresh_reference_gives_zero_rewards_and_zero_displacement():
    c, r = torch.tensor(PAIRS["chosen"]), torch.tensor(PAIRS["rejected"])
    out = preference_signals(c, r, ref_chosen_logps=c.clone(), ref_rejected_logps=r.clone())
    assert [out[k].item() for k in (keys.PREF_MARGIN, keys.PREF_ACCURACY, keys.PREF_CHOSEN_DISPLACEMENT)] == [0, 0, 0]


def test_nan_and_inf_reach_the_signals_they_enter():
    p = {**PAIRS, "chosen": [math.nan, -12.5, -30.0, -7.25]}
    got = measure(p)
    assert math.isnan(got[keys.PREF_MARGIN]) and math.isnan(got[keys.PREF_ACCURACY])  # not a "wrong" pair
    assert math.isnan(got[keys.PREF_CHOSEN_DISPLACEMENT])
    assert got[keys.PREF_REJECTED_LOGP] == pytest.approx(np.mean(PAIRS["rejected"]))  # untouched
    got = measure({**PAIRS, "chosen": [-math.inf, -12.5, -30.0, -7.25]})
    assert got[keys.PREF_CHOSEN_LOGP] == -math.inf and got[keys.PREF_CHOSEN_REWARD] == -math.inf
    got = measure({**PAIRS, "chosen_tokens": [0, 10, 12, 4]})  # a pair without tokens has no per-token value
    assert math.isnan(got[keys.PREF_CHOSEN_LOGP_TOKEN]) and math.isnan(got[keys.PREF_CHOSEN_DISPLACEMENT])
    assert not math.isnan(got[keys.PREF_CHOSEN_LOGP])


V = torch.zeros(3)
BAD = [
    ({"chosen_logps": torch.zeros(3, 2)}, r"chosen_logps=a torch.float32 tensor of shape \(3, 2\).*1-d floating"),
    ({"chosen_logps": torch.zeros(0)}, r"chosen_logps=.*shape \(0,\).*non-empty"),
    ({"chosen_logps": torch.zeros(3, dtype=torch.long)}, r"chosen_logps=a torch.int64.*floating"),
    ({"chosen_logps": [-1.0, -2.0, -3.0]}, r"chosen_logps=\[-1.0, -2.0, -3.0\]"),
    ({"rejected_logps": torch.zeros(4)}, r"rejected_logps is .*\(4,\).*chosen_logps of shape \(3,\)"),
    ({"ref_chosen_logps": V}, r"one is given, the other None"),
    ({"ref_rejected_logps": V}, r"one is given, the other None"),
    ({"ref_chosen_logps": V, "ref_rejected_logps": torch.zeros(2)}, r"ref_rejected_logps is .*\(2,\)"),
    ({"beta": 0.0}, r"beta=0.0; allowed: a finite number > 0"),
    ({"beta": -0.1}, r"beta=-0.1"),
    ({"beta": math.nan}, r"beta=nan"),
    ({"beta": True}, r"beta=True"),
    ({"beta": "0.1"}, r"beta='0.1'"),
    ({"chosen_tokens": torch.ones(4)}, r"chosen_tokens=.*\(4,\).*allowed: a real tensor of shape \(3,\)"),
    ({"rejected_tokens": torch.ones(3, dtype=torch.bool)}, r"rejected_tokens=a torch.bool"),
    ({"rejected_tokens": [1, 2, 3]}, r"rejected_tokens=\[1, 2, 3\]"),
]


@pytest.mark.parametrize(("bad", "message"), BAD)
def test_bad_input_gets_one_clear_error(bad, message):
    kwargs = {"chosen_logps": V, "rejected_logps": V, **bad}
    with pytest.raises(ValueError, match=message):
        preference_signals(**kwargs)


def test_no_host_read_and_no_host_to_device_copy():
    # on the meta device a host read of a value (.item(), a Python branch on a tensor) fails; token counts held on
    # the host are the one allowed copy (documented), so they start on meta here too
    t = {k: torch.tensor(v).to("meta") for k, v in PAIRS.items()}
    with HostToDevice() as mode:
        out = preference_signals(
            t["chosen"],
            t["rejected"],
            ref_chosen_logps=t["ref_chosen"],
            ref_rejected_logps=t["ref_rejected"],
            chosen_tokens=t["chosen_tokens"],
            rejected_tokens=t["rejected_tokens"],
        )
    assert mode.copies == []
    assert len(out) == 9 and all(v.device.type == "meta" for v in out.values())


logps = st.lists(st.floats(-500.0, 0.0, allow_nan=False), min_size=1, max_size=16)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), beta=st.floats(0.01, 5.0))
def test_matches_the_float64_reference_on_any_batch(data, beta):
    n = len(data.draw(logps, label="size"))
    same = st.lists(st.floats(-500.0, 0.0, allow_nan=False), min_size=n, max_size=n)
    p = {k: data.draw(same, label=k) for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
    for k in ("chosen_tokens", "rejected_tokens"):
        p[k] = data.draw(st.lists(st.integers(1, 2048), min_size=n, max_size=n), label=k)
    got, expected = measure(p, beta=beta, dtype=torch.float64), reference(p, beta)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
