"""Loss-scale thrash: benign GradScaler sawtooths stay silent; consecutive backoffs and a falling scale are named.

Scale sequences follow GradScaler.update's rule (checked against torch's own kernel, ``torch._amp_update_scale_``),
fed with a chosen overflow pattern, so the sawtooth is the real one.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel._core import Observation, keys
from keel.detect import default_detectors
from keel.detect.loss_scale_thrash import LossScaleThrashConfig, LossScaleThrashDetector
from keel.guard import Guard


def update_scale(scale, tracker, over, growth_interval):
    """GradScaler.update's rule (growth 2, backoff 0.5), in Python; checked against torch's kernel below."""
    if over:
        return scale * 0.5, 0
    if tracker + 1 == growth_interval:
        return scale * 2.0, 0
    return scale, tracker + 1


def scaler_trace(overflows, *, growth_interval=2000, init=2.0**16):
    """Observations of a GradScaler fed ``overflows`` (one bool per step)."""
    scale, tracker, out = init, 0, []
    for step, over in enumerate(overflows):
        out.append(Observation(step=step, values={keys.AMP_OVERFLOW: float(over), keys.AMP_SCALE: scale}))
        scale, tracker = update_scale(scale, tracker, over, growth_interval)
    return out


def threshold_overflows(log2_limits, *, growth_interval, init=2.0**16):
    """Overflow iff the scale exceeds the gradients' headroom 2**log2_limits[t]: what a real run's scaler sees."""
    scale, tracker, overs = init, 0, []
    for limit in log2_limits:
        overs.append(math.log2(scale) > limit)
        scale, tracker = update_scale(scale, tracker, overs[-1], growth_interval)
    return overs


def test_the_python_scale_rule_is_torchs_kernel():
    overs = [s % 7 == 0 or s % 11 == 0 for s in range(300)]  # clean stretches of 0 to 6 steps: grows and backs off
    scale, tracker = torch.tensor(2.0**16), torch.tensor(0, dtype=torch.int32)
    for o in scaler_trace(overs, growth_interval=5):
        assert o.values[keys.AMP_SCALE] == float(scale)
        found_inf = torch.tensor(o.values[keys.AMP_OVERFLOW])
        torch._amp_update_scale_(scale, tracker, found_inf, 2.0, 0.5, 5)


def feed(det, observations):
    return [f for o in observations for f in det.update(o)]


@st.composite
def benign_limits(draw, max_steps):
    """The gradients' headroom (log2 of the largest scale that does not overflow) between 2⁶ and 2³⁰, drifting at
    most 4 doublings per 400 steps with per-step jitter under one doubling: the regime in which the scaler settles
    (a headroom near 1 is the min-scale trouble itself; 4 doublings lost within a 50-step run is gradients growing
    16x, the fall the detector is for: the slow property test found it)."""
    n = draw(st.integers(50, max_steps))
    start = draw(st.floats(10.0, 30.0))
    drift = draw(st.floats(-4.0, 4.0)) / max(n, 400)
    jitter = draw(st.lists(st.floats(0.0, 0.9), min_size=n, max_size=n))
    return [start + drift * t - j for t, j in enumerate(jitter)]


def _benign_is_silent(limits, growth_interval):
    overs = threshold_overflows(limits, growth_interval=growth_interval)
    assert feed(LossScaleThrashDetector(), scaler_trace(overs, growth_interval=growth_interval)) == []


@settings(max_examples=10, deadline=None, derandomize=True)
@given(limits=benign_limits(max_steps=400), growth_interval=st.sampled_from([10, 25, 100]))
def test_any_benign_scaler_sequence_gives_no_finding(limits, growth_interval):
    _benign_is_silent(limits, growth_interval)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, derandomize=True)
@given(limits=benign_limits(max_steps=2000), growth_interval=st.sampled_from([10, 25, 100, 500, 2000]))
def test_any_benign_scaler_sequence_gives_no_finding_many_long_runs(limits, growth_interval):
    _benign_is_silent(limits, growth_interval)


def test_the_initial_search_down_from_2_16_is_benign():
    overs = [True] * 12 + [False] * 300  # 65536 → 16: the scaler finding its level
    assert feed(LossScaleThrashDetector(), scaler_trace(overs)) == []


def test_three_backoffs_in_a_row_warn_and_ten_are_critical():
    overs = [True] * 2 + [False] * 100 + [True] * 12
    found = feed(LossScaleThrashDetector(), scaler_trace(overs))
    assert [(f.step, f.kind, f.severity) for f in found] == [
        (104, "loss_scale_thrash", "warning"),
        (111, "loss_scale_thrash", "critical"),
    ]
    assert found[0].evidence["consecutive"] == 3 and found[0].evidence["onset_step"] == 102
    assert found[0].advice  # the cause catalogue explains it


def test_overflows_far_more_often_than_growths_warn_when_the_scale_has_halved_four_times():
    # one overflow every 10 steps, never two in a row, against a growth interval of 50: the scale sinks
    overs = [False] * 20 + [s % 10 == 0 for s in range(200)]
    obs = scaler_trace(overs, growth_interval=50)
    found = feed(LossScaleThrashDetector(), obs)
    assert [(f.step, f.severity) for f in found] == [(51, "warning"), (171, "critical")]  # then down to 1
    assert found[0].evidence["halvings"] == 4 and found[0].evidence["consecutive"] == 0
    assert found[0].evidence["overflows_in_window"] == 4


def test_a_scale_at_its_minimum_is_critical_even_during_the_initial_search():
    found = feed(LossScaleThrashDetector(), scaler_trace([True] * 17))
    assert [(f.step, f.severity) for f in found] == [(16, "critical")]  # 2¹⁶ halved 16 times: 1


def test_after_recovery_a_new_fall_is_a_new_episode():
    overs = [False] * 10 + [True] * 3 + [False] * 600 + [True] * 3
    found = feed(LossScaleThrashDetector(), scaler_trace(overs, growth_interval=100))
    assert [(f.step, f.severity) for f in found] == [(12, "warning"), (615, "warning")]


def test_silent_without_its_keys_and_on_non_finite_values():
    det = LossScaleThrashDetector()
    for step in range(50):
        assert det.update(Observation(step=step, values={keys.AMP_SCALE: 1e-3})) == []
        assert det.update(Observation(step=step, values={keys.AMP_OVERFLOW: 1.0, keys.AMP_SCALE: math.nan})) == []
        assert det.update(Observation(step=step, values={keys.LOSS: 1.0})) == []


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"max_consecutive": 0}, "max_consecutive"),
        ({"max_consecutive": 2.5}, "max_consecutive"),
        ({"window": 0}, "window"),
        ({"max_halvings": 0.0}, "max_halvings"),
        ({"max_halvings": math.nan}, "max_halvings"),
        ({"min_scale": -1.0}, "min_scale"),
        ({"max_consecutive": 5, "critical_consecutive": 4}, "critical_consecutive"),
    ],
)
def test_bad_config_is_refused_naming_the_field(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LossScaleThrashConfig(**fields)


def test_it_is_a_default_detector():
    assert "loss_scale_thrash" in [d.name for d in default_detectors()]


class _Recorder:
    name = "recorder"

    def __init__(self):
        self.values = []

    def update(self, obs):
        self.values.append(dict(obs.values))
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_guard_records_the_overflow_flag_the_scaler_left_on_the_device():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    rec = _Recorder()
    with Guard(model, opt, policy="observe", scaler=scaler, detectors=[rec]) as guard:
        for step in range(3):
            loss = model(torch.ones(2, 4)).pow(2).mean()
            scaler.scale(loss).backward()
            if step == 1:
                model.weight.grad[0, 0] = math.inf  # an fp16 overflow, as the scaler sees it
            guard.step(loss)
            opt.zero_grad()
    assert [v[keys.AMP_OVERFLOW] for v in rec.values] == [0.0, 1.0, 0.0]
    assert [v[keys.AMP_SCALE] for v in rec.values] == [1024.0, 1024.0, 512.0]  # backed off after the overflow
