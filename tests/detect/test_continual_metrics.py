"""Continual metrics: a worked example computed by hand, properties over random histories, hostile inputs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel.detect.continual_metrics import TaskEval, continual_metrics, largest_drop, phase_at

# Three tasks: a trains steps 0-99, b 100-199, c from 200. Evals after steps 49, 99, 149, 199, 249 (every 50).
PHASES = [(0, "a"), (100, "b"), (200, "c")]
STEPS = [49, 99, 149, 199, 249]


def _worked_example() -> dict[str, TaskEval]:
    return {
        "eval/a": TaskEval(task="a", steps=STEPS, values=[0.60, 0.90, 0.50, 0.80, 0.70]),
        "eval/b": TaskEval(task="b", steps=STEPS, values=[0.10, 0.10, 0.70, 0.85, 0.40]),
        "eval/c": TaskEval(task="c", steps=STEPS, values=[0.20, 0.20, 0.20, 0.30, 0.60]),
    }


def test_worked_example_matches_the_hand_computation():
    """By hand, as of the eval after step 249 (task c current; a and b finished):

    a: seen from step 0: [.6 .9 .5 .8 .7]; finished at steps 149, 199, 249 → min .5; its phase ended at step 100:
       last eval in it .9 (step 99), latest .7 → forgetting .2; maintenance mean(.5−.9, .8−.9, .7−.9) = −.2333.
    b: seen from step 100: [.7 .85 .4] (steps 149, 199, 249); finished only at 249 → min .4; last eval in its phase
       .85 → forgetting .45; maintenance (.4 − .85) = −.45.
    c: seen from step 200: [.6] (step 249); current → A(c) = .6.
    min-ACC = mean(.5, .4) = .45; WC-ACC = mean(.6, .5, .4) = .5 = (1/3)·.6 + (2/3)·.45.
    WF^2 (adjacent pairs): a max(.4 at .9→.5, .1 at .8→.7) = .4; b .45 (.85→.4); c 0 → mean .85/3 = .28333.
    WP^2: a max(.3, .3) = .3; b .15; c 0 → mean .15. WF^10 (whole history): a .9−.5 = .4; b .45; c 0 → .28333.
    forgetting = mean(.2, .45) = .325; BWT = −.325; performance maintenance = mean(−.2333, −.45) = −.34167.
    """
    got = continual_metrics(_worked_example(), PHASES, windows=(2, 10))
    expected = {
        keys.CONTINUAL_MIN_ACC: 0.45,
        keys.CONTINUAL_WC_ACC: 0.5,
        keys.CONTINUAL_WF_PER_WINDOW + "2": 0.85 / 3,
        keys.CONTINUAL_WP_PER_WINDOW + "2": 0.15,
        keys.CONTINUAL_WF_PER_WINDOW + "10": 0.85 / 3,
        keys.CONTINUAL_WP_PER_WINDOW + "10": (0.3 + 0.15) / 3,
        keys.CONTINUAL_FORGETTING: 0.325,
        keys.CONTINUAL_BWT: -0.325,
        keys.CONTINUAL_PERFORMANCE_MAINTENANCE: (-0.7 / 3 - 0.45) / 2,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_a_loss_eval_reads_a_rise_as_forgetting_and_reports_its_worst_value_in_its_own_units():
    # the worked example's accuracies as losses (1 − acc): the same drops, the levels as the worst (highest) loss
    tracks = {
        k: TaskEval(task=t.task, goal="min", steps=t.steps, values=[1 - v for v in t.values])
        for k, t in _worked_example().items()
    }
    got = continual_metrics(tracks, PHASES, windows=(2,))
    assert got[keys.CONTINUAL_MIN_ACC] == pytest.approx(1 - 0.45)
    assert got[keys.CONTINUAL_WC_ACC] == pytest.approx(1 - 0.5)
    assert got[keys.CONTINUAL_FORGETTING] == pytest.approx(0.325)
    assert got[keys.CONTINUAL_WF_PER_WINDOW + "2"] == pytest.approx(0.85 / 3)


def test_mixed_goals_give_the_drops_but_no_levels():
    tracks = _worked_example()
    tracks["eval/a"] = TaskEval(task="a", goal="min", steps=STEPS, values=[1 - v for v in tracks["eval/a"].values])
    got = continual_metrics(tracks, PHASES, windows=(2,))
    assert keys.CONTINUAL_MIN_ACC not in got and keys.CONTINUAL_WC_ACC not in got
    assert got[keys.CONTINUAL_FORGETTING] == pytest.approx(0.325)


@pytest.mark.parametrize(
    ("tracks", "phases", "expected_keys"),
    [
        ({}, PHASES, set()),  # no eval tied to a task
        ({"eval/a": TaskEval(task="a", steps=[9], values=[0.5])}, [], set()),  # no phase
        ({"eval/a": TaskEval(task="a")}, PHASES, set()),  # an eval with no value yet
        # one eval, while its task trains: only the current level and the (empty) windows
        (
            {"eval/a": TaskEval(task="a", steps=[9], values=[0.5])},
            [(0, "a")],
            {keys.CONTINUAL_WC_ACC, keys.CONTINUAL_WF_PER_WINDOW + "10", keys.CONTINUAL_WP_PER_WINDOW + "10"},
        ),
        # every value NaN: nothing to say
        ({"eval/a": TaskEval(task="a", steps=[9, 19], values=[math.nan, math.nan])}, PHASES, set()),
        # a task never trained (its phase never came): its evals do not count
        ({"eval/z": TaskEval(task="z", steps=[9, 19], values=[0.9, 0.1])}, PHASES, set()),
    ],
    ids=["no tracks", "no phase", "no value", "one eval", "all NaN", "task never trained"],
)
def test_hostile_histories_leave_out_what_cannot_be_computed(tracks, phases, expected_keys):
    got = continual_metrics(tracks, phases, windows=(10,))
    assert set(got) == expected_keys
    assert all(math.isfinite(v) for v in got.values())


def test_nan_evals_are_skipped_not_propagated():
    tracks = _worked_example()
    tracks["eval/a"].values[2] = math.nan  # a's .5 at step 149 is lost: its minimum becomes .7
    got = continual_metrics(tracks, PHASES, windows=(2,))
    assert got[keys.CONTINUAL_MIN_ACC] == pytest.approx((0.7 + 0.4) / 2)


def test_evals_before_a_task_is_trained_do_not_count():
    # b's 0.1 at steps 49 and 99 (before its phase) would otherwise be its minimum and a window drop
    got = continual_metrics({"eval/b": _worked_example()["eval/b"]}, PHASES, windows=(10,))
    assert got[keys.CONTINUAL_MIN_ACC] == pytest.approx(0.4)
    assert got[keys.CONTINUAL_WP_PER_WINDOW + "10"] == pytest.approx(0.15)  # .7 → .85, not .1 → .85


def test_task_eval_refuses_steps_out_of_order():
    track = TaskEval(task="a")
    track.add(10, 0.5)
    with pytest.raises(ValueError, match="step=9"):
        track.add(9, 0.5)


def test_phase_at_is_the_phase_whose_first_step_is_the_latest_not_after_step():
    assert [phase_at(PHASES, s) for s in (0, 99, 100, 10**9)] == ["a", "a", "b", "c"]
    assert phase_at([(5, "a")], 4) is None


@pytest.mark.parametrize(
    ("values", "window", "expected"),
    [
        ([], 3, 0.0),
        ([1.0], 3, 0.0),
        ([1.0, 2.0, 3.0], 3, 0.0),
        ([3.0, 1.0, 2.0, 0.0], 2, 2.0),
        ([3.0, 1.0, 2.0, 0.0], 4, 3.0),
    ],
)
def test_largest_drop_on_hand_cases(values, window, expected):
    assert largest_drop(values, window) == expected


@pytest.mark.slow  # hypothesis; test_largest_drop_on_hand_cases checks the same claim on a table
@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.floats(-10, 10), max_size=30), st.integers(1, 12))
def test_largest_drop_equals_the_brute_force_maximum_over_pairs_in_the_window(values, window):
    brute = max([values[i] - values[j] for j in range(len(values)) for i in range(max(0, j - window + 1), j)] + [0.0])
    assert largest_drop(values, window) == pytest.approx(brute, abs=1e-12)


_value = st.one_of(st.floats(0, 1), st.just(math.nan))


@pytest.mark.slow  # hypothesis; the worked example and the hostile table check the same properties by hand
@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(_value, _value, _value), min_size=1, max_size=12), st.integers(1, 11))
def test_properties_of_random_three_task_histories(rows, switch):
    """min-ACC ≤ the finished tasks' mean latest value; WC-ACC between min-ACC and the current task's value;
    WF, WP ≥ 0; BWT = −forgetting."""
    steps = [10 * i + 9 for i in range(len(rows))]
    phases = [(0, "a"), (10 * switch, "b")]
    tracks = {f"eval/{t}": TaskEval(task=t, steps=steps, values=[row[i] for row in rows]) for i, t in enumerate("abc")}
    got = continual_metrics(tracks, phases, windows=(3,))
    current = phase_at(phases, steps[-1])
    if keys.CONTINUAL_MIN_ACC in got:
        latest = [v for t in tracks.values() if t.task != current and (v := _last_seen(t, phases)) is not None]
        assert got[keys.CONTINUAL_MIN_ACC] <= sum(latest) / len(latest) + 1e-12
        now = _last_seen(tracks[f"eval/{current}"], phases, finished=False)
        if now is not None:
            low, high = sorted((got[keys.CONTINUAL_MIN_ACC], now))
            assert low - 1e-12 <= got[keys.CONTINUAL_WC_ACC] <= high + 1e-12
    assert got.get(keys.CONTINUAL_WF_PER_WINDOW + "3", 0.0) >= 0
    assert got.get(keys.CONTINUAL_WP_PER_WINDOW + "3", 0.0) >= 0
    assert got.get(keys.CONTINUAL_BWT) == (
        -got[keys.CONTINUAL_FORGETTING] if keys.CONTINUAL_FORGETTING in got else None
    )
    assert "eval/c" not in got and all(math.isfinite(v) for v in got.values())


def _last_seen(track: TaskEval, phases: list[tuple[int, str]], *, finished: bool = True) -> float | None:
    """The track's latest finite value since its task was first trained (only while finished, by default)."""
    starts = [s for s, name in phases if name == track.task]
    values = [
        v
        for s, v in zip(track.steps, track.values, strict=True)
        if starts and s >= starts[0] and math.isfinite(v) and not (finished and phase_at(phases, s) == track.task)
    ]
    return values[-1] if values else None
