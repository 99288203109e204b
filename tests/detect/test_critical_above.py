"""`SpikeDetector.critical_above`: the value from which `update` says critical, known before the value is.

The device gate of ``Guard(sync="deferred")`` skips an update when the loss or gradient norm reaches it, so it
must agree with `update` on every state: generated histories (log and linear scales, warm-up, episodes,
outliers in the tail) and values on both sides of the limit.
"""

import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keel._core.observation import Observation
from keel.detect import SpikeConfig, SpikeDetector

CONFIGS = st.sampled_from(
    [
        SpikeConfig(signal="loss"),
        SpikeConfig(signal="loss", window=8, min_history=4, patience=2, rebase_after=5),
        SpikeConfig(signal="loss", log_scale=False, window=8, min_history=4),
        SpikeConfig(
            signal="grad/norm",
            log_scale=True,
            min_excess=1.0,
            scale_floor=0.05,
            critical_excess=19.0,
            window=16,
            min_history=8,
        ),
    ]
)
HISTORY = st.lists(
    st.one_of(st.floats(min_value=1.0, max_value=3.0), st.sampled_from([2.0, 2.0, 9.0, 40.0, 0.0, math.nan])),
    max_size=70,
)
FACTORS = st.one_of(
    st.floats(min_value=0.3, max_value=0.999),
    st.floats(min_value=1.001, max_value=200.0),
    st.floats(min_value=0.999999, max_value=1.000001),
)


@settings(max_examples=300, deadline=None)
@given(config=CONFIGS, history=HISTORY, factor=FACTORS)
def test_update_is_critical_exactly_from_the_limit_on(config, history, factor):
    det = SpikeDetector(config)
    for step, value in enumerate(history):
        det.update(Observation(step=step, values={config.signal: value}))
    step = len(history)
    limit = det.critical_above(step)
    median = 2.0 if not math.isfinite(limit) else limit
    value = median * factor
    assume(not math.isfinite(limit) or abs(value - limit) > 1e-9 * abs(limit))  # rounding at the limit itself
    found = det.update(Observation(step=step, values={config.signal: value}))
    assert any(f.severity == "critical" for f in found) == (value >= limit)


def test_the_generated_cases_reach_both_sides_of_a_finite_limit():
    seen = {"critical": 0, "below": 0}

    # derandomized: a count over random draws fell short about one run in eight ({'critical': 16, ...})
    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(config=CONFIGS, history=HISTORY, factor=FACTORS)
    def count(config, history, factor):
        det = SpikeDetector(config)
        for step, value in enumerate(history):
            det.update(Observation(step=step, values={config.signal: value}))
        limit = det.critical_above(len(history))
        if math.isfinite(limit):
            seen["critical" if factor >= 1 else "below"] += 1

    count()
    # what the draws give also depends on the modules loaded before (hypothesis mines their constants): 16–27
    # critical cases seen; the claim is that both sides are reached often, not an exact count
    assert seen["critical"] >= 10 and seen["below"] >= 5, seen
