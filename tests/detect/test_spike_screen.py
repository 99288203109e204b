"""The spike screen is safe: every value the detector's own judgement flags is among the screened-in ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.detect._spike_screen import possible_spikes
from keel.detect.robust import relative_excess, robust_location_scale, robust_z


def flagged(window, values, *, log, threshold, min_excess, scale_floor):
    """The spike detector's judgement of each value against the rolling window, every value accepted."""
    acc, w = list(window) + list(values), len(window)
    out = []
    for p, y in enumerate(values):
        median, scale = robust_location_scale(acc[p : p + w])
        floor = scale_floor if log else scale_floor * abs(median) + 1e-12
        z = robust_z(y, median, scale, floor)
        excess = relative_excess(y - median) if log else (y - median) / (abs(median) + 1e-12)
        out.append(not (z < threshold or excess < min_excess))
    return np.array(out, dtype=bool)


SETTINGS = st.sampled_from(
    [
        dict(threshold=6.0, min_excess=0.1, scale_floor=0.01),
        dict(threshold=6.0, min_excess=1.0, scale_floor=0.05),
        dict(threshold=3.0, min_excess=0.01, scale_floor=1e-6),
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    w=st.sampled_from([1, 2, 3, 8, 9, 64, 65]),
    log=st.booleans(),
    sigma=st.sampled_from([0.0, 1e-3, 0.05, 0.3, 2.0]),
    offset=st.sampled_from([0.0, 5.0, -3.0, 1e6]),
    quantised=st.booleans(),
    n=st.integers(0, 300),
    spikes=st.lists(st.floats(-5, 50), max_size=6),
    cfg=SETTINGS,
)
def test_property_screen_never_misses_a_value_the_detector_flags(
    seed, w, log, sigma, offset, quantised, n, spikes, cfg
):
    rng = np.random.default_rng(seed)
    x = offset + sigma * rng.standard_normal(w + n)
    if quantised:  # ties everywhere
        x = np.round(x, 1)
    x[rng.integers(0, w + n, len(spikes))] += spikes
    window, values = x[:w], x[w:]
    truth = flagged(window.tolist(), values.tolist(), log=log, **cfg)
    maybe = possible_spikes(window, values, log=log, **cfg)
    assert maybe.shape == values.shape
    assert not (truth & ~maybe).any(), np.flatnonzero(truth & ~maybe)
    # screened from values off by up to `error` (relative), as NumPy's log is against math.log: still safe,
    # even off the worst way (the window up, the values down)
    error = 1e-9
    maybe = possible_spikes(
        window + error * np.abs(window), values - error * np.abs(values), log=log, error=error, **cfg
    )
    assert not (truth & ~maybe).any(), np.flatnonzero(truth & ~maybe)


def test_screen_lets_healthy_noise_through_and_flags_a_spike():
    # the point of the screen: almost every healthy value is certainly quiet
    rng = np.random.default_rng(0)
    ys = 0.05 * rng.standard_normal(20_064)
    ys[10_000] += 1.0  # e^1: 2.7x
    maybe = possible_spikes(ys[:64], ys[64:], log=True, threshold=6.0, min_excess=0.1, scale_floor=0.01)
    assert maybe[10_000 - 64] and maybe.sum() < 0.005 * len(maybe)


def test_values_near_the_float_limit_are_never_screened_out():
    # a mean of two values near 1.8e308 overflows to inf, and the detector's z becomes NaN: judged by update
    window = np.full(8, 1.7e308)
    maybe = possible_spikes(
        window, np.array([1.7e308, 0.0]), log=False, threshold=6.0, min_excess=0.1, scale_floor=0.01
    )
    assert maybe.all()
    assert possible_spikes(window, np.zeros(0), log=False, threshold=6.0, min_excess=0.1, scale_floor=0.01).size == 0


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize("level", [-3.0, 5.0, 1e6])
def test_screen_is_safe_at_the_thresholds_with_values_off_by_its_error_bound(log, level):
    # a constant window makes the bounds exact (scale = floor), so values just past the z and the excess
    # thresholds test the margins themselves; the window is off upwards and the values downwards by `error`
    cfg = dict(threshold=6.0, min_excess=0.1, scale_floor=0.01)
    window = np.full(64, level)
    floor = cfg["scale_floor"] if log else cfg["scale_floor"] * abs(level) + 1e-12
    edges = [cfg["threshold"] * floor, math.log1p(cfg["min_excess"]), cfg["min_excess"] * (abs(level) + 1e-12)]
    values = level + np.concatenate([edge * (1 + np.linspace(-1e-6, 1e-6, 101)) for edge in edges])
    error = 1e-9
    truth, maybe = [], []
    for value in values:  # each against the constant window (a series would take earlier values into it)
        truth += flagged(window.tolist(), [value], log=log, **cfg).tolist()
        maybe += possible_spikes(
            window + error * np.abs(window), np.array([value - error * abs(value)]), log=log, error=error, **cfg
        ).tolist()
    truth, maybe = np.array(truth), np.array(maybe)
    assert truth.any() and not truth.all()
    assert not (truth & ~maybe).any(), np.flatnonzero(truth & ~maybe)
