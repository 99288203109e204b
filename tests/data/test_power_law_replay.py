"""PowerLawReplay: the schedule against a hand computation, the stream it yields, DataLoader use, bad arguments."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.data import PowerLawReplay

TASKS = [range(0, 10), range(10, 20), range(20, 30)]


def test_task_probabilities_match_a_hand_computation():
    sampler = PowerLawReplay(TASKS, samples_per_task=10, replay_fraction=0.25, exponent=1.0)
    # position 25 is in task 2's phase; task 0 ended at 10 (age 25 − 10 + 1 = 16), task 1 at 20 (age 6):
    # weights 1/16 and 1/6, normalised: 0.2727… and 0.7272…; times the replay fraction 0.25
    p0, p1 = (1 / 16) / (1 / 16 + 1 / 6), (1 / 6) / (1 / 16 + 1 / 6)
    assert sampler.task_probabilities(25) == pytest.approx([0.25 * p0, 0.25 * p1, 0.75])
    assert sampler.task_probabilities(3) == [1.0, 0.0, 0.0]  # nothing to replay during the first task
    assert sampler.task_probabilities(10) == pytest.approx([0.25, 0.75, 0.0])  # task 0 is the only earlier one


def test_exponent_zero_is_uniform_replay_and_a_larger_exponent_favours_recent_tasks():
    uniform = PowerLawReplay(TASKS, samples_per_task=10, exponent=0.0)
    steep = PowerLawReplay(TASKS, samples_per_task=10, exponent=2.0)
    assert uniform.replay_weights(25) == pytest.approx([0.5, 0.5])
    assert steep.replay_weights(25) == pytest.approx([(1 / 256) / (1 / 256 + 1 / 36), (1 / 36) / (1 / 256 + 1 / 36)])


def test_the_stream_follows_the_schedule():
    tasks = [range(0, 50), range(50, 100), range(100, 150)]
    sampler = PowerLawReplay(tasks, samples_per_task=2000, replay_fraction=0.3, exponent=1.0, seed=1)
    stream = list(sampler)
    assert len(stream) == len(sampler) == 6000
    assert all(i < 50 for i in stream[:2000])  # task 0's phase is task 0 only
    third = Counter(i // 50 for i in stream[4000:])
    expected = [sum(sampler.task_probabilities(p)[t] for p in range(4000, 6000)) for t in range(3)]
    for task in range(3):  # binomial standard error ≤ √(2000 · 0.25) ≈ 22; 5 of them
        assert abs(third[task] - expected[task]) < 110
    assert stream == list(PowerLawReplay(tasks, samples_per_task=2000, replay_fraction=0.3, seed=1))


def test_the_current_task_is_seen_in_full_passes_before_any_example_repeats():
    sampler = PowerLawReplay([range(0, 4), range(4, 8)], samples_per_task=8, replay_fraction=0.0, seed=3)
    stream = list(sampler)
    assert sorted(stream[:4]) == sorted(stream[4:8]) == [0, 1, 2, 3]
    assert sorted(stream[8:12]) == sorted(stream[12:]) == [4, 5, 6, 7]


def test_a_dataloader_draws_batches_through_it():
    data = torch.utils.data.TensorDataset(torch.arange(30.0))
    sampler = PowerLawReplay(TASKS, samples_per_task=10, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=5, sampler=sampler)
    values = torch.cat([batch for (batch,) in loader]).long().tolist()
    assert values == list(sampler)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": []}, "tasks: allowed: one or more non-empty"),
        ({"tasks": [range(3), []]}, "tasks: allowed"),
        ({"tasks": [[0, -1]]}, "tasks: allowed"),
        ({"samples_per_task": 0}, "samples_per_task=0"),
        ({"samples_per_task": 2.0}, "samples_per_task=2.0"),
        ({"replay_fraction": 1.0}, r"replay_fraction=1.0; allowed: a number in \[0, 1\)"),
        ({"replay_fraction": math.nan}, "replay_fraction=nan"),
        ({"exponent": -0.5}, "exponent=-0.5"),
        ({"exponent": math.inf}, "exponent=inf"),
        ({"seed": -1}, "seed=-1"),
        ({"seed": True}, "seed=True"),
    ],
)
def test_bad_arguments_get_one_error_naming_the_value(kwargs, message):
    args = {"tasks": TASKS, "samples_per_task": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        PowerLawReplay(args.pop("tasks"), **args)


def test_a_position_outside_the_stream_is_refused():
    with pytest.raises(ValueError, match=r"position=30; allowed: an int in \[0, 30\)"):
        PowerLawReplay(TASKS, samples_per_task=10).task_probabilities(30)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    st.integers(1, 5),
    st.integers(1, 20),
    st.floats(0, 0.99),
    st.floats(0, 4),
    st.data(),
)
def test_probabilities_sum_to_one_and_never_point_ahead(n_tasks, per_task, fraction, exponent, data):
    sampler = PowerLawReplay(
        [range(3 * t, 3 * t + 3) for t in range(n_tasks)],
        samples_per_task=per_task,
        replay_fraction=fraction,
        exponent=exponent,
    )
    position = data.draw(st.integers(0, len(sampler) - 1))
    probabilities = sampler.task_probabilities(position)
    assert sum(probabilities) == pytest.approx(1.0)
    assert all(p == 0.0 for p in probabilities[position // per_task + 1 :])
    weights = sampler.replay_weights(position)
    assert weights == sorted(weights)  # the more recently a task ended, the likelier its replay


def test_a_resumed_stream_continues_where_the_position_was_kept():
    # guard.track(PowerLawReplay(...)) was refused (no state_dict): a resumed continual run started the task
    # stream over at task 0 (reviewer V9)
    def sampler():
        return PowerLawReplay([range(0, 5), range(5, 10), range(10, 15)], samples_per_task=6, replay_fraction=0.5)

    whole = list(sampler())
    first = sampler()
    it = iter(first)
    head = [next(it) for _ in range(8)]
    state = first.state_dict()
    assert state == {"position": 8} and head == whole[:8]
    resumed = sampler()
    resumed.load_state_dict(state)
    assert list(resumed) == whole[8:]
    assert list(resumed) == whole  # the next pass starts at the beginning
    with pytest.raises(ValueError, match=r"allowed: \{'position': an int in \[0, 18\]\}"):
        resumed.load_state_dict({"position": 19})
