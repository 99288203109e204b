"""Every registered detector: name == file stem, returns Findings, state round-trips."""

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Finding, Observation
from keel._core.finding import SEVERITIES
from keel.detect import DETECTORS, create_detector, list_detectors
from tests.detect.drives import BLOCKS, DRIVES, PARAMS, reads_of
from tests.detect.test_fast_paths import canonical


@pytest.mark.parametrize("name", list_detectors())
def test_contract(name):
    det = create_detector(name)
    assert det.name == name
    assert DETECTORS.get(name).__module__.rsplit(".", 1)[-1] == name
    found = []
    for step in range(150):
        found += det.update(
            Observation(step=step, values={"loss": 2.0 + (10.0 if step == 120 else 0.0), "grad/norm": 1.0})
        )
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


# --- every detector driven with the signals it reads (tests/detect/drives.py) ---------------------------------
DRIVEN = list_detectors()
FIELDS = ("loss", "grad/norm", "param/norm", "lr", "amp/scale")  # read or used for evidence by some detector
ODD = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e300, -1e300, 1e-300]
FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
HOSTILE = st.one_of(FINITE, st.sampled_from(ODD))


def _feed(det, observations):
    return [f for o in observations for f in det.update(o)]


def _assert_well_formed(finding, steps):
    assert isinstance(finding, Finding)
    assert isinstance(finding.kind, str) and finding.kind
    assert finding.severity in SEVERITIES
    assert isinstance(finding.step, int) and finding.step in steps  # a finite step: one it was shown
    assert isinstance(finding.signal, str) and finding.signal
    json.dumps(finding.evidence)  # JSON-able as it is (the store writes it), no `default=` needed
    assert isinstance(finding.cause, str) and finding.cause
    assert isinstance(finding.advice, str)


def _touched(observations):
    touched = {k for o in observations for k in (*o.values, *o.per_param)}
    return touched | {k[: i + 1] for k in touched for i, c in enumerate(k) if c == "/"}  # a family, by its members


def test_every_registered_detector_has_a_drive():
    assert set(DRIVES) == set(list_detectors())


@pytest.mark.parametrize("name", DRIVEN)
def test_a_healthy_series_of_its_own_signals_finds_nothing(name):
    det, healthy = create_detector(name), DRIVES[name].healthy()
    assert set(reads_of(det)) <= _touched(healthy)  # driven with every signal it reads
    assert _feed(det, healthy) == []


@pytest.mark.parametrize("name", DRIVEN)
def test_a_series_with_its_trouble_is_found_with_well_formed_findings(name):
    det, trigger = create_detector(name), DRIVES[name].trigger()
    assert set(reads_of(det)) & _touched(trigger)
    found = _feed(det, trigger)
    assert any(f.severity != "info" for f in found)
    for f in found:
        _assert_well_formed(f, {o.step for o in trigger})


@st.composite
def _observations(draw, reads, numbers):
    """Observations of the detector's keys and a few others, each absent or of ``numbers``; families included."""
    out = []
    for step in range(draw(st.integers(1, 20))):
        values, per_param = {}, {}
        for key in draw(st.lists(st.sampled_from(sorted(set(reads) | set(FIELDS))), unique=True)):
            if key.endswith("/"):
                names = draw(st.sampled_from([(), BLOCKS, PARAMS]))
                per_param[key] = (names, [draw(numbers) for _ in names])
            else:
                values[key] = draw(numbers)
        out.append(Observation(step=1000 + step, values=values, per_param=per_param))
    return out


def _never_raises(name, data, numbers):
    det, healthy = create_detector(name), DRIVES[name].healthy()
    prefix = healthy[: data.draw(st.integers(0, len(healthy)))]  # from fresh, warmed-up or anywhere between
    _feed(det, prefix)
    hostile = data.draw(_observations(reads_of(det), numbers))
    for f in _feed(det, hostile):
        _assert_well_formed(f, {o.step for o in hostile})
    json.dumps(det.state_dict())


@pytest.mark.parametrize("name", DRIVEN)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_random_finite_values_never_raise(name, data):
    _never_raises(name, data, FINITE)


@pytest.mark.parametrize("name", DRIVEN)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_nan_inf_and_missing_keys_never_raise(name, data):
    _never_raises(name, data, HOSTILE)


@pytest.mark.parametrize("name", DRIVEN)
def test_state_round_trip_gives_identical_next_findings(name):
    trigger = DRIVES[name].trigger()
    whole = create_detector(name)
    found = [whole.update(o) for o in trigger]
    whole_state = canonical(whole.state_dict())
    assert any(found)
    for cut in range(0, len(trigger) + 1, max(1, len(trigger) // 12)):
        det = create_detector(name)
        _feed(det, trigger[:cut])
        restored = create_detector(name)
        restored.load_state_dict(json.loads(json.dumps(det.state_dict())))  # as a snapshot stores it
        assert canonical([restored.update(o) for o in trigger[cut:]]) == canonical(found[cut:]), cut
        assert canonical(restored.state_dict()) == whole_state


SAVED = json.loads((Path(__file__).parent / "data" / "states_before_episode.json").read_text())


@pytest.mark.parametrize("name", sorted(SAVED))
def test_a_state_saved_before_the_shared_episode_helper_resumes_identically(name):
    # each detector's state mid-episode (after its first finding on its trigger series), saved by the detectors
    # as they were before `keel.detect._episode` (commit 2927599): an older run's snapshot must resume as before
    saved, trigger = SAVED[name], DRIVES[name].trigger()
    whole = create_detector(name)
    found = [whole.update(o) for o in trigger]
    resumed = create_detector(name)
    resumed.load_state_dict(saved["state"])
    assert canonical([resumed.update(o) for o in trigger[saved["cut"] :]]) == canonical(found[saved["cut"] :])
    state, expected = canonical(resumed.state_dict()), canonical(whole.state_dict())
    for key in MEASURED_UNDER_AN_OLDER_RULE.get(name, ()):  # the saved episode's own measure, kept as it was taken
        state.pop(key), expected.pop(key)
    for key in KEPT_SINCE.get(name, ()):  # an older state never kept it: the rule that reads it is off for that run
        assert state.pop(key) == canonical(math.nan), key
        expected.pop(key)
    for field in DEFAULTS_CHANGED_SINCE.get(name, ()):  # a snapshot resumes with the settings it was saved with
        expected["config"][field] = saved["state"]["config"][field]
    assert state == expected


# Values a saved state holds that were measured under a rule changed since: the spike detector's trend rule
# (TREND_SPREAD 3 -> 2, the recent step noise; session 13) measures the open episode's onset excess differently.
MEASURED_UNDER_AN_OLDER_RULE = {"spike": ("onset_excess",)}
# State kept since the states were saved: the divergence detector's level over the run's first steps (session 16),
# behind its back-at-the-start critical rule.
KEPT_SINCE = {"divergence": ("start",)}
# Config defaults changed since the states were saved (the saved config is restored with the state, and kept): the
# divergence detector's min_history 50 -> 20 (session 14, a416e1f).
DEFAULTS_CHANGED_SINCE = {"divergence": ("min_history",)}
