import math

import numpy as np
import pytest

from keel._core import Observation
from keel.detect.spike import SpikeConfig, SpikeDetector


def _run(det, values, key="loss"):
    found = []
    for step, v in enumerate(values):
        found.extend(det.update(Observation(step=step, values={key: v})))
    return found


def _noisy(n, level=2.0, rel=0.02, seed=0, decay=0.0):
    rng = np.random.default_rng(seed)
    return [level * (1 + rel * rng.standard_normal()) * math.exp(-decay * i) + 0.0 for i in range(n)]


def test_single_extreme_step_is_critical_at_that_step():
    values = _noisy(200)
    values[120] = 6.0
    found = _run(SpikeDetector(signal="loss"), values)
    assert [(f.step, f.severity, f.kind) for f in found] == [(120, "critical", "loss_spike")]
    assert found[0].baseline == pytest.approx(2.0, rel=0.02)
    assert found[0].evidence["onset_step"] == 120


def test_moderate_one_batch_outlier_is_info_only():
    values = _noisy(200)
    values[100] = 2.5  # +25 %: well outside the noise, not extreme
    found = _run(SpikeDetector(signal="loss"), values)
    assert [(f.step, f.severity) for f in found] == [(100, "info")]


def test_persistent_elevation_warns_after_patience_once():
    values = _noisy(200)
    for i in range(100, 110):
        values[i] = 2.6
    found = _run(SpikeDetector(signal="loss"), values)
    assert [(f.step, f.severity) for f in found] == [(100, "info"), (102, "warning")]
    assert found[1].evidence["onset_step"] == 100


def test_flagged_steps_stay_out_of_the_baseline():
    det = SpikeDetector(signal="loss")
    values = _noisy(100)
    for i in range(60, 65):
        values[i] = 2.6
    _run(det, values)
    assert max(det.state_dict()["accepted"]) < 2.3


def test_clean_traces_raise_nothing_above_info():
    for seed in range(5):
        values = [2.0 + 3.0 * math.exp(-i / 50) for i in range(2000)]  # a falling loss
        rng = np.random.default_rng(seed)
        values = [v * (1 + 0.02 * rng.standard_normal()) for v in values]
        found = _run(SpikeDetector(signal="loss"), values)
        assert [f for f in found if f.severity != "info"] == []


def test_warm_up_is_silent():
    values = _noisy(19) + [50.0]
    assert _run(SpikeDetector(signal="loss"), values[:20]) == []


def test_grad_norm_uses_log_scale_and_needs_a_large_factor():
    values = _noisy(300, level=1.0, rel=0.1)
    values[150] = 3.0   # 3x: info (one step)
    values[250] = 40.0  # 40x: critical
    found = _run(SpikeDetector(signal="grad/norm"), values, key="grad/norm")
    assert [(f.step, f.severity, f.kind) for f in found] == [(150, "info", "grad_spike"), (250, "critical", "grad_spike")]


def test_lasting_level_shift_becomes_the_baseline():
    values = _noisy(100) + _noisy(200, level=3.0, seed=1)
    found = _run(SpikeDetector(signal="loss"), values)
    rebased = [f for f in found if f.evidence.get("rebased")]
    assert len(rebased) == 1 and rebased[0].step == 100 + 49
    assert all(f.step < 150 for f in found)  # silent once the new level is the baseline


def test_non_finite_and_missing_values_are_ignored():
    det = SpikeDetector(signal="loss")
    _run(det, _noisy(50))
    assert det.update(Observation(step=50, values={"loss": float("nan")})) == []
    assert det.update(Observation(step=51, values={"loss": float("inf")})) == []
    assert det.update(Observation(step=52, values={})) == []
    assert len(det.state_dict()["accepted"]) == 50


def test_state_dict_round_trip_continues_identically():
    values = _noisy(300, seed=3)
    values[200] = 9.0
    a = SpikeDetector(signal="loss")
    _run(a, values[:150])
    b = SpikeDetector(signal="loss")
    b.load_state_dict(a.state_dict())
    rest = list(enumerate(values))[150:]
    fa = [f for s, v in rest for f in a.update(Observation(step=s, values={"loss": v}))]
    fb = [f for s, v in rest for f in b.update(Observation(step=s, values={"loss": v}))]
    assert fa == fb and len(fa) == 1


@pytest.mark.parametrize("field,value", [("window", 0), ("threshold", -1.0), ("min_excess", float("nan")),
                                         ("min_history", 100)])
def test_bad_config_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=field):
        SpikeConfig(**{field: value})


def test_negative_losses_work_in_linear_mode():
    values = [-1.0 + 0.01 * (i % 3) for i in range(100)]
    values[80] = 5.0
    found = _run(SpikeDetector(signal="loss"), values)
    assert [(f.step, f.severity) for f in found] == [(80, "critical")]
