import math

import numpy as np
import pytest

from keel._core import Observation
from keel.detect.divergence import DivergenceConfig, DivergenceDetector


def _run(det, values):
    return [f for s, v in enumerate(values) for f in det.update(Observation(step=s, values={"loss": v}))]


def test_sustained_rise_warns_then_goes_critical_once_each():
    rng = np.random.default_rng(0)
    values = [2.0 * (1 + 0.02 * rng.standard_normal()) for _ in range(100)]
    values += [2.0 + 0.04 * i for i in range(1, 101)]  # slow divergence: 2 → 6
    found = _run(DivergenceDetector(), values)
    assert [f.severity for f in found] == ["warning", "critical"]
    warn, crit = found
    # median of 9 passes 2.5 (25 %) at rise index ~17; +patience 10
    assert 120 <= warn.step <= 132
    assert crit.value >= 2 * crit.baseline * 0.98
    assert warn.evidence["onset_step"] < warn.step


def test_falling_and_noisy_loss_is_silent():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        values = [(2.0 + 3.0 * math.exp(-i / 100)) * (1 + 0.05 * rng.standard_normal()) for i in range(2000)]
        values[500] = 20.0  # one-batch outliers do not move a median
        values[1500] = float("nan")
        assert _run(DivergenceDetector(), values) == []


def test_episode_resets_after_recovery():
    values = [2.0] * 60 + [3.0] * 30 + [2.0] * 30 + [3.0] * 30
    found = _run(DivergenceDetector(), values)
    assert [f.severity for f in found] == ["warning", "warning"]


def test_bad_config():
    with pytest.raises(ValueError, match="warn_excess"):
        DivergenceConfig(warn_excess=2.0, critical_excess=1.0)
    with pytest.raises(ValueError, match="patience"):
        DivergenceConfig(patience=0)


def test_state_round_trip():
    values = [2.0] * 60 + [5.0] * 40
    a = DivergenceDetector()
    _run(a, values[:70])
    b = DivergenceDetector()
    b.load_state_dict(a.state_dict())
    tail = list(enumerate(values))[70:]
    assert [f for s, v in tail for f in a.update(Observation(step=s, values={"loss": v}))] == \
           [f for s, v in tail for f in b.update(Observation(step=s, values={"loss": v}))]
