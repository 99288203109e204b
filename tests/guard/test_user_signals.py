"""Guard.step(loss, signals={...}): the loop's own values are recorded beside keel's and refused when malformed."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel import Guard
from keel.guard.user_signals import split_signals
from keel.store.reader import RunReader


def _loop(tmp_path, steps, signals_of, policy="observe", sync="step"):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=sync == "deferred")
    with Guard(model, opt, run_dir=str(tmp_path), policy=policy, sync=sync) as guard:
        for step in range(steps):
            loss = model(torch.ones(4, 3)).pow(2).mean()
            loss.backward()
            guard.step(loss, signals=signals_of(step))
            opt.zero_grad()
    return RunReader(tmp_path)


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_tensor_and_number_signals_are_stored_under_their_keys_step_by_step(tmp_path, sync):
    reader = _loop(
        tmp_path,
        5,
        lambda i: {"dpo/chosen_logp": torch.tensor(-1.0 - i), "reward/mean": 0.5 * i},
        sync=sync,
    )
    with reader:
        steps, chosen = reader.signal("dpo/chosen_logp")
        _, reward = reader.signal("reward/mean")
    assert list(steps) == [0, 1, 2, 3, 4]
    assert list(chosen) == [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert list(reward) == [0.0, 0.5, 1.0, 1.5, 2.0]


@pytest.mark.parametrize(
    "value, stored", [(10**400, math.inf), (-(10**400), -math.inf), (Fraction(10**400, 3), math.inf)]
)
def test_a_number_beyond_float_range_is_recorded_as_an_infinity_not_an_overflow_error(value, stored):
    """``float(10**400)`` raises OverflowError; it escaped the one-clear-error rule (reviewer h26 V8)."""
    _, on_host = split_signals({"reward/mean": value}, torch.device("cpu"))
    assert on_host == {"reward/mean": stored}


def test_non_finite_signal_values_are_recorded_not_refused(tmp_path):
    reader = _loop(tmp_path, 2, lambda i: {"reward/mean": math.nan, "grpo/kl": torch.tensor(math.inf)})
    with reader:
        assert math.isnan(reader.signal("reward/mean")[1][0])
        assert reader.signal("grpo/kl")[1][0] == math.inf


def test_observe_with_signals_trains_bit_identically_to_the_bare_loop(tmp_path):
    def train(with_guard):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = Guard(model, opt, policy="observe") if with_guard else None
        for _ in range(4):
            loss = model(torch.ones(2, 3)).pow(2).mean()
            loss.backward()
            if guard is None:
                opt.step()
            else:
                guard.step(loss, signals={"reward/mean": loss.detach() * 2})
            opt.zero_grad()
        return model.weight.detach().clone()

    assert torch.equal(train(True), train(False))


HOSTILE = [
    ({"loss": 1.0}, "keel measures itself"),
    ({"grad/norm": torch.tensor(1.0)}, "keel measures itself"),
    ({"lr/1": 0.1}, "keel measures itself"),
    ({"": 1.0}, "non-empty str"),
    ({3: 1.0}, "non-empty str"),
    ({"reward/mean": torch.ones(3)}, "shape (3,)"),
    ({"reward/mean": torch.tensor(True)}, "torch.bool"),
    ({"reward/mean": torch.tensor(1 + 2j)}, "complex"),
    ({"reward/mean": "1.0"}, "allowed: a 0-d tensor or a real number"),
    ({"reward/mean": None}, "allowed: a 0-d tensor or a real number"),
    ({"reward/mean": True}, "allowed: a 0-d tensor or a real number"),
    ([("reward/mean", 1.0)], "allowed: a dict"),
    ({"reward/mean": torch.tensor(1.0, device="meta")}, "meta device"),
]


@pytest.mark.parametrize("signals, message", HOSTILE)
def test_a_malformed_signal_gets_one_error_naming_it_and_nothing_is_stepped(signals, message):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    with Guard(model, opt) as guard:
        loss = model(torch.ones(2, 3)).pow(2).mean()
        loss.backward()
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            guard.step(loss, signals=signals)
        assert guard.global_step == 0
    assert torch.equal(model.weight, before)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda k: k.strip() and not k.startswith(("loss", "lr", "grad/"))),
        st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**6), 10**6),
        max_size=5,
    )
)
def test_any_dict_of_real_numbers_under_free_keys_is_accepted_as_floats(signals):
    signals = {k: v for k, v in signals.items() if not k.startswith(("param/", "update/", "time/", "amp/", "keel/"))}
    on_device, on_host = split_signals(signals, torch.device("cpu"))
    assert on_device == {}
    assert set(on_host) == set(signals)
    for key, value in signals.items():
        assert on_host[key] == float(value) or (math.isnan(on_host[key]) and math.isnan(value))
