"""Hypothesis strategies for detector input series: the messy shapes real logs have.

Healthy multiplicative noise around a falling or flat curve, with spikes, level shifts, NaN/±Inf, missing
values, zeros, negative stretches (a loss leaving log space), long constant stretches (ties in every window),
extreme magnitudes, and restarts (a rewind to an earlier step, as `keel doctor` does for a resumed run).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

ODD = [math.nan, math.inf, -math.inf, None, 0.0, -1.0, 1e300, 1e-300, -1e300]


@st.composite
def shaped_series(draw, *, max_len: int = 2000) -> list[float | None]:
    """A series built from a random shape and random events (see the module docstring)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(200, max_len))
    level = draw(st.sampled_from([1e-3, 0.1, 2.0, 1e4]))
    scale = draw(st.sampled_from([0.0, 1e-4, 0.02, 0.3, 1.0]))
    df = draw(st.sampled_from([None, 3]))
    t = np.arange(n)
    trend = draw(st.sampled_from(["flat", "falling", "epochs"]))
    curve = {"flat": np.ones(n), "falling": 0.1 + np.exp(-t / max(1, n / 4)), "epochs": 0.5 ** (t // max(1, n // 5))}[
        trend
    ]
    eps = rng.standard_normal(n) if df is None else rng.standard_t(df, n)
    x = level * curve * np.exp(scale * eps)
    if draw(st.booleans()):  # quantised values: ties in every window
        x = np.round(x / (level * 0.05)) * level * 0.05
    for _ in range(draw(st.integers(0, 6))):  # spikes and level shifts
        at = int(rng.integers(0, n))
        length = int(draw(st.sampled_from([1, 1, 3, 12, 60, 400])))
        x[at : at + length] *= draw(st.sampled_from([0.2, 1.3, 2.5, 40.0, 1e5]))
    if draw(st.booleans()):  # a stretch that leaves log space (a loss going to zero or negative)
        at = int(rng.integers(0, n))
        x[at : at + int(rng.integers(1, 200))] -= level * draw(st.sampled_from([1.0, 3.0]))
    values: list[float | None] = x.tolist()
    for _ in range(draw(st.integers(0, 8))):
        values[int(rng.integers(0, n))] = draw(st.sampled_from(ODD))
    return values


def raw_series(max_len: int = 300) -> st.SearchStrategy[list[float | None]]:
    """Short series from a small alphabet with hostile values: ties, signs, infinities, extremes."""
    alphabet = st.one_of(
        st.sampled_from([1.0, 1.0, 2.0, 0.5, 3.0, 1.1, 0.9]),
        st.sampled_from(ODD),
        st.floats(-1e6, 1e6, allow_nan=False),
        st.floats(1e-9, 1e9),
    )
    return st.lists(alphabet, max_size=max_len)


def restarts(n: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    """(at, back_to) pairs: after observation ``at`` the detector is rewound to its state before ``back_to``."""
    point = st.integers(0, max(0, n - 1))
    return st.lists(st.tuples(point, point).map(lambda p: (max(p), min(p))), max_size=3)
