"""A one-batch spike on the plateau right after a run's first fast fall (helper Y's L2, a real Lightning run: loss
5 → 0.1 in about 20 steps, ±30 % batch noise after, ×23 at step 61): the window's median sits on the plateau, so the
old descent test did not see the fall, and the fall's spread hid the spike — no finding at all. The window's older
half still lies in the fall: the step is judged against the plateau's recent level and step noise."""

import numpy as np
import pytest

from keel._core import Observation
from keel.detect.spike import SpikeDetector


def _fall_then_jump(seed):
    rng = np.random.default_rng(seed)
    level = 0.12 + 4.9 * np.exp(-np.arange(150) / 5.0)
    x = level * np.exp(0.26 * rng.standard_normal(150))
    x[61] = x[60] * 23
    return x


@pytest.mark.parametrize("seed", [1, 2, 5])  # the draws that raised nothing before
def test_a_jump_on_the_plateau_after_the_fall_is_found_at_its_step(seed):
    x = _fall_then_jump(seed)
    det = SpikeDetector(signal="loss")
    found = [f for s, v in enumerate(x) for f in det.update(Observation(step=s, values={"loss": float(v)}))]
    assert [f.step for f in found] == [61]
    assert found[0].evidence["z"] >= 6


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_scan_gives_what_update_gives(seed):
    x = _fall_then_jump(seed)
    det = SpikeDetector(signal="loss")
    by_step = [f for s, v in enumerate(x) for f in det.update(Observation(step=s, values={"loss": float(v)}))]
    scanned = SpikeDetector(signal="loss").scan(np.arange(len(x)), x)
    assert [(f.step, f.severity, f.evidence) for f in scanned] == [(f.step, f.severity, f.evidence) for f in by_step]


def test_the_same_fall_without_a_jump_raises_nothing():
    for seed in range(20):
        x = _fall_then_jump(seed)
        x[61] = x[60]
        assert SpikeDetector(signal="loss").scan(np.arange(len(x)), x) == []
