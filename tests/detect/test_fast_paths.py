"""The spike and divergence detectors' fast online ``update`` finds exactly what the pre-change algorithm found.

The oracle (`tests/detect/reference_detectors.py`) sorts its windows on every step; the detectors keep them
sorted and select the MAD. Same findings (steps, kinds, severities, values, evidence, texts) and the same
``state_dict`` on every hypothesis-made series, through restarts (a rewind by ``load_state_dict``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation
from keel.detect.divergence import DivergenceConfig, DivergenceDetector
from keel.detect.spike import SpikeConfig, SpikeDetector
from tests.detect.reference_detectors import ReferenceDivergence, ReferenceSpike
from tests.detect.series import raw_series, restarts, shaped_series

SPIKES = {
    "loss": lambda cls: cls(signal="loss"),
    "grad": lambda cls: cls(signal="grad/norm"),
    "linear": lambda cls: cls(SpikeConfig(signal="grad/norm", log_scale=False)),
    "small": lambda cls: cls(SpikeConfig(window=8, min_history=3, patience=2, rebase_after=6, threshold=3.0)),
    "odd": lambda cls: cls(SpikeConfig(window=9, min_history=9, rebase_after=4, critical_excess=0.3)),
}
DIVERGENCES = {
    "default": lambda cls: cls(),
    "small": lambda cls: cls(DivergenceConfig(short=4, window=20, min_history=5, patience=3, noise_margin=1.0)),
    "quick": lambda cls: cls(DivergenceConfig(short=3, window=9, min_history=3, patience=1, warn_excess=0.05,
                                              critical_excess=0.1)),
}


def canonical(x):
    """A comparable form in which NaN equals NaN and 0.0 differs from -0.0 (bit-identity, not closeness)."""
    if isinstance(x, dict):
        return {k: canonical(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [canonical(v) for v in x]
    if isinstance(x, float):
        return ("float", repr(x))
    if hasattr(x, "__dataclass_fields__"):
        return canonical(asdict(x))
    return x


def drive(det, series, events, *, key, fast):
    """Feed ``series`` (None: not logged); after observation ``at`` rewind to the state before ``back_to``."""
    rewind = dict(events)
    wanted = set(rewind.values())
    states, found, step = {}, [], 0
    for i, v in enumerate(series):
        if i in wanted:
            states[i] = (step, det.state_dict() if fast else copy.deepcopy(det))
        found += det.update(Observation(step=step, values={} if v is None else {key: v}))
        step += 1
        if i in rewind:
            step, saved = states[rewind[i]]
            if fast:
                det = type(det)()
                det.load_state_dict(saved)
            else:
                det = copy.deepcopy(saved)
    return found, det.state_dict()


def check(make_pair, series, events, key):
    fast = drive(make_pair(True), series, events, key=key, fast=True)
    reference = drive(make_pair(False), series, events, key=key, fast=False)
    assert canonical(fast) == canonical(reference)
    return fast[0]


def _spike_pair(name):
    return lambda fast: SPIKES[name](SpikeDetector if fast else ReferenceSpike)


def _divergence_pair(name):
    return lambda fast: DIVERGENCES[name](DivergenceDetector if fast else ReferenceDivergence)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SPIKES)), data=st.data())
def test_property_spike_update_equals_the_sorting_reference(name, data):
    series = data.draw(st.one_of(shaped_series(), raw_series()))
    events = data.draw(restarts(len(series)))
    check(_spike_pair(name), series, events, SPIKES[name](SpikeDetector).config.signal)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(DIVERGENCES)), data=st.data())
def test_property_divergence_update_equals_the_sorting_reference(name, data):
    series = data.draw(st.one_of(shaped_series(), raw_series()))
    events = data.draw(restarts(len(series)))
    check(_divergence_pair(name), series, events, "loss")


def test_the_equivalence_check_sees_a_changed_finding():
    # the oracle comparison is not vacuous: a series with findings, and a detector that differs from it
    series = [2.0 + 0.01 * (i % 3) for i in range(100)]
    series[60] = 9.0
    assert check(_spike_pair("loss"), series, [], "loss")
    slack = lambda fast: SpikeDetector(SpikeConfig(threshold=6.1)) if fast else ReferenceSpike()  # noqa: E731
    series[60] = 2.0 * math.exp(6.05 * 0.01 * 1.4826 * 0.5)
    series[61] = 6.0
    with pytest.raises(AssertionError):
        check(slack, series, [], "loss")


def test_hostile_magnitudes_and_a_zero_baseline_do_not_raise():
    # each raised before (OverflowError, ValueError, ZeroDivisionError), and the doctor switched the detector off
    # for the rest of the log: exp(x) - 1 of 10^300 over a median of 10^-300; a log-ratio whose quotient
    # underflows to 0; a window size that overflows; a spike over a linear baseline of exactly 0
    def run(det, series, key="loss"):
        return [(f.step, f.severity) for i, v in enumerate(series)
                for f in det.update(Observation(step=i, values={key: v}))]

    assert run(SpikeDetector(signal="loss"), [1e-300] * 80 + [1e300] * 3 + [1e-300] * 20)[:1] == [(80, "critical")]
    found = run(DivergenceDetector(), [1e300] * 100 + [1e-300] * 300 + [1e300] * 100)
    assert found and found[0][0] > 400 and found[-1][1] == "critical"
    # a loss crossing zero at 1e300: relative changes of 1e300, whose window size overflowed a float
    assert run(DivergenceDetector(DivergenceConfig(short=3, window=9, min_history=3)), [1.0, -1e300] * 10) == []
    linear = SpikeDetector(SpikeConfig(signal="grad/norm", log_scale=False))
    assert run(linear, [0.0] * 40 + [1e-3], key="grad/norm") == [(40, "critical")]
