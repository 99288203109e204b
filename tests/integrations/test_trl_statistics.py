"""Reading a TRL trainer's ``_metrics["train"]`` step by step (keel.integrations._trl_statistics): pure Python, no
trl import — the real trainers are in test_trl.py."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel.integrations._trl_statistics import UNMAPPED_PREFIX, NewStatistics, signal_key

NAMES = ["rewards/margins", "entropy", "num_tokens", "rewards/my_func/mean"]


def test_trl_names_map_through_the_alias_table_and_the_rest_go_under_trl():
    assert {name: signal_key(name) for name in keys.TRL_ALIASES} == keys.TRL_ALIASES
    assert signal_key("logits/chosen") == UNMAPPED_PREFIX + "logits/chosen"
    assert signal_key("loss") == UNMAPPED_PREFIX + "loss"  # never one of keel's own keys


# Operations a TRL trainer performs on _metrics between two reads: append a micro-batch's value, reassign a list
# (num_tokens), or clear everything (log()).
operation = st.one_of(
    st.tuples(st.just("append"), st.sampled_from(NAMES), st.floats(-1e6, 1e6, allow_nan=False)),
    st.tuples(st.just("assign"), st.sampled_from(NAMES), st.floats(-1e6, 1e6, allow_nan=False)),
    st.tuples(st.just("clear"), st.just(""), st.just(0.0)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(operation, max_size=6), min_size=1, max_size=8))
def test_each_read_returns_the_mean_of_exactly_the_values_added_since_the_last_read(steps):
    metrics: defaultdict[str, list] = defaultdict(list)
    reader = NewStatistics(metrics)
    for ops in steps:
        added: dict[str, list[float]] = {}
        for op, name, value in ops:
            if op == "append":
                metrics[name].append(value)
                added.setdefault(name, []).append(value)
            elif op == "assign":
                metrics[name] = [value]
                added[name] = [value]
            else:
                metrics.clear()
                added = {}  # what TRL's log() cleared before keel's read is gone (TRL logged it)
        got = reader.take()
        assert got.problems == {}
        assert got.values == {signal_key(n): sum(v) / len(v) for n, v in added.items()}


def test_nan_and_inf_are_values_and_numpy_and_one_element_tensors_are_numbers():
    metrics = {
        "reward": [1.0, math.nan],
        "kl": [math.inf],
        "entropy": [np.float32(2.5)],
        "rewards/margins": [torch.tensor([0.5])],
        "num_tokens": [np.array(7)],
    }
    got = NewStatistics(metrics).take()
    assert got.problems == {}
    assert math.isnan(got.values[keys.RL_REWARD_MEAN]) and got.values[keys.RL_KL] == math.inf
    assert got.values[keys.RL_ENTROPY] == 2.5 and got.values[keys.PREF_MARGIN] == 0.5
    assert got.values[signal_key("num_tokens")] == 7.0


@pytest.mark.parametrize(
    "value",
    [
        [1.0, 2.0],
        "0.5",
        None,
        True,
        torch.ones(2),
        torch.tensor(1 + 2j),
        torch.tensor(True),
        np.ones(3),
        {"mean": 1.0},
        complex(1, 1),
        object(),
    ],
    ids=lambda v: "object()" if type(v) is object else repr(v),  # an object's repr holds its address: not stable
)
def test_a_value_that_is_not_one_real_number_is_a_problem_named_with_the_statistic_and_the_rest_is_read(value):
    metrics = {"entropy": [1.0], "bad": [0.5, value]}
    got = NewStatistics(metrics).take()
    assert got.values == {keys.RL_ENTROPY: 1.0}
    assert list(got.problems) == ["bad"] and "allowed: one real number per entry" in got.problems["bad"]


@pytest.mark.parametrize(
    ("metrics", "name"),
    [({"entropy": 1.0}, "entropy"), ({"entropy": (1.0,)}, "entropy"), ({3: [1.0]}, "3"), ({"": [1.0]}, "''")],
)
def test_a_statistic_that_is_not_a_list_under_a_name_is_a_problem_not_a_crash(metrics, name):
    got = NewStatistics(metrics).take()
    assert got.values == {} and list(got.problems) == [name]


class Exploding:
    """A value whose numel() raises: keel reads it as not a number instead of raising."""

    def numel(self):
        raise RuntimeError("boom")

    def item(self):
        raise RuntimeError("boom")


def test_an_object_that_raises_when_read_is_a_problem_not_a_crash():
    got = NewStatistics({"x": [Exploding()]}).take()
    assert got.values == {} and "Exploding" in got.problems["x"]
