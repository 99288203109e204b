"""Every registered detector: name == file stem, returns Findings, state round-trips."""

import json

import pytest

from keel._core import Finding, Observation
from keel.detect import DETECTORS, create_detector, list_detectors


@pytest.mark.parametrize("name", list_detectors())
def test_contract(name):
    det = create_detector(name)
    assert det.name == name
    assert DETECTORS.get(name).__module__.rsplit(".", 1)[-1] == name
    found = []
    for step in range(150):
        found += det.update(Observation(step=step, values={"loss": 2.0 + (10.0 if step == 120 else 0.0),
                                                           "grad/norm": 1.0}))
    assert all(isinstance(f, Finding) for f in found)
    state = det.state_dict()
    json.dumps(state)  # plain data: snapshots store it without pickling
    other = create_detector(name)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        DETECTORS.register("spike")(object)


def test_unknown_name_lists_the_allowed():
    with pytest.raises(ValueError, match="allowed: .*spike"):
        create_detector("nope")
