"""The divergence detector's second critical rule: a sustained rise back to where the run began.

A run that fell from its first steps' level to a best and climbed all the way back has lost what it learned, even
when that is short of twice the best (keel's own overhead loop at a constant LR of 1e-3: 5.6 → 2.9 → 5.7).
"""

import math

import numpy as np

from keel._core import Observation
from keel.detect.divergence import DivergenceDetector


def _series(start, best, end, *, noise=0.01, seed=0):
    """``start`` for 9 steps, a fall to ``best`` held for 150 steps, then a climb to ``end`` held for 100."""
    rng = np.random.default_rng(seed)
    level = [start] * 9 + list(np.geomspace(start, best, 30)) + [best] * 120
    level += list(np.geomspace(best, end, 20)) + [end] * 100
    return [v * (1 + noise * rng.standard_normal()) for v in level]


def _run(det, values):
    return [f for s, v in enumerate(values) for f in det.update(Observation(step=s, values={"loss": v}))]


def test_a_rise_back_to_the_start_is_critical_short_of_twice_the_best():
    values = _series(4.0, 2.5, 4.1)  # 1.64x the best: past the start, short of 2x
    found = _run(DivergenceDetector(), values)
    assert [f.severity for f in found][-1] == "critical"  # (a warning first or not: the climb is fast)
    critical = found[-1]
    assert critical.value < 2 * critical.baseline
    assert math.isclose(critical.evidence["start"], 4.0, rel_tol=0.02)
    assert critical.value >= critical.evidence["start"]
    assert "back at the level of the run's first 9 steps" in critical.cause


def test_a_rise_that_stays_below_the_start_is_a_warning():
    found = _run(DivergenceDetector(), _series(4.0, 2.5, 3.6))  # 1.44x the best, 10 % under the start
    assert [f.severity for f in found] == ["warning"]
    assert "start" not in found[0].evidence


def test_a_fall_too_small_to_be_real_does_not_make_the_start_a_threshold():
    # 2.0 → 1.7 is a 15 % fall, under the 25 % a rise must show: a rise to 2.3 (35 % over the best, above the start)
    # is a warning, as it was before the rule
    found = _run(DivergenceDetector(), _series(2.0, 1.7, 2.3))
    assert [f.severity for f in found] == ["warning"]


def test_twice_the_best_is_critical_as_before_and_names_no_start():
    found = _run(DivergenceDetector(), _series(5.0, 2.0, 4.6))  # the start is over 2x the best: 2x decides
    assert [f.severity for f in found][-1] == "critical"
    assert "start" not in found[-1].evidence and "first 9 steps" not in found[-1].cause


def test_scan_gives_what_update_gives():
    for values in (_series(4.0, 2.5, 4.1), _series(4.0, 2.5, 3.6), _series(5.5, 2.9, 5.6, noise=0.08, seed=3)):
        by_step = _run(DivergenceDetector(), values)
        in_bulk = DivergenceDetector()
        scanned = in_bulk.scan(np.arange(len(values)), np.array(values))
        assert [(f.step, f.severity, f.evidence, f.cause) for f in scanned] == [
            (f.step, f.severity, f.evidence, f.cause) for f in by_step
        ]


def test_the_start_survives_a_state_round_trip():
    values = _series(4.0, 2.5, 4.1)
    whole = _run(DivergenceDetector(), values)
    first = DivergenceDetector()
    _run(first, values[:100])
    resumed = DivergenceDetector()
    resumed.load_state_dict(first.state_dict())
    rest = [f for s, v in enumerate(values[100:], 100) for f in resumed.update(Observation(step=s, values={"loss": v}))]
    assert [(f.step, f.severity) for f in rest] == [(f.step, f.severity) for f in whole]


def test_hostile_starts_never_make_the_rule_fire():
    # non-finite values at the start are not part of it; a loss below zero has no "back to the start" in ratios
    values = [math.nan, math.inf, -math.inf] + _series(4.0, 2.5, 3.6)
    assert [f.severity for f in _run(DivergenceDetector(), values)] == ["warning"]
    negative = [-v for v in _series(4.0, 2.5, 4.1)]  # a reward-like objective: lower is better, all below 0
    assert all(f.severity != "critical" or "first 9 steps" not in f.cause for f in _run(DivergenceDetector(), negative))
    zeros = [0.0] * 9 + _series(4.0, 2.5, 3.6)[9:]  # a start of 0: nothing is back above it in ratios
    assert "first 9 steps" not in " ".join(f.cause for f in _run(DivergenceDetector(), zeros))
