"""The severity ladder the predictive detectors share, and the finding the cause catalogue explains."""

from __future__ import annotations

import json

import pytest

from keel._core.finding import Finding
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect.causes import CAUSES


def test_each_severity_is_reported_once_per_episode_and_warning_only_first():
    ep = Episode()
    assert ep.escalate(critical=False, warning=False) is None
    assert ep.escalate(critical=False, warning=True) == "warning"
    assert ep.escalate(critical=False, warning=True) is None  # once per episode
    assert ep.escalate(critical=True, warning=True) == "critical"
    assert ep.escalate(critical=True, warning=True) is None
    assert ep.reported == "critical"
    ep.close()
    assert ep.escalate(critical=True, warning=True) == "critical"  # a new episode: critical straight away
    assert ep.escalate(critical=False, warning=True) is None  # no warning after a critical


def test_a_run_begins_at_its_onset_and_breaking_it_keeps_the_onset_until_the_next_run():
    ep = Episode()
    assert ep.qualify(onset=7) is True
    assert ep.qualify(onset=9) is False
    assert (ep.run, ep.onset) == (2, 7)
    ep.break_run()
    assert (ep.run, ep.onset) == (0, 7)
    assert ep.onset_or(12) == 7
    assert ep.qualify(onset=11) is True
    assert (ep.run, ep.onset) == (1, 11)


def test_calm_ends_the_run_but_remembers_what_was_reported_and_close_forgets_it():
    ep = Episode()
    ep.qualify(onset=3)
    ep.escalate(critical=False, warning=True)
    ep.calm()
    assert (ep.run, ep.onset, ep.reported) == (0, -1, "warning")
    assert ep.onset_or(12) == 12
    ep.close()
    assert (ep.run, ep.onset, ep.reported) == (0, -1, None)


def test_open_dates_the_episode_once():
    ep = Episode()
    ep.open(5)
    ep.open(8)
    assert ep.onset == 5


def test_state_holds_the_keys_a_detector_stores_and_round_trips_through_json():
    ep = Episode(keys=("onset", "reported"))
    ep.open(4)
    ep.escalate(critical=True, warning=False)
    state = json.loads(json.dumps(ep.state_dict()))
    assert state == {"onset": 4, "reported": "critical"}
    other = Episode(keys=("onset", "reported"))
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert Episode().state_dict() == {"run": 0, "onset": -1, "reported": None}


def test_a_state_without_a_key_starts_it_fresh_and_a_bad_one_is_one_clear_error():
    ep = Episode()
    ep.load_state_dict({"reported": "warning"})  # a state saved before the detector stored its run
    assert (ep.run, ep.onset, ep.reported) == (0, -1, "warning")
    with pytest.raises(ValueError, match=r"reported='loud'; allowed: None, 'warning', 'critical'"):
        ep.load_state_dict({"run": 1, "onset": 2, "reported": "loud"})
    with pytest.raises(ValueError, match=r"Episode keys=\('runs',\); allowed: .*'run'"):
        Episode(keys=("runs",))


def test_an_explained_finding_carries_the_catalogue_entry_of_its_kind():
    cause = CAUSES["softmax_collapse"]
    f = explained_finding(
        step=3,
        kind="softmax_collapse",
        severity="warning",
        signal="logits/softmax_collapse",
        value=0.2,
        baseline=0.01,
        evidence={"fraction": 0.2},
        text="20% of the rows are one-hot.",
    )
    assert isinstance(f, Finding)
    assert (f.step, f.kind, f.severity, f.signal, f.value, f.baseline) == (
        3,
        "softmax_collapse",
        "warning",
        "logits/softmax_collapse",
        0.2,
        0.01,
    )
    assert f.cause == f"20% of the rows are one-hot. {cause.mechanism}"
    assert f.advice == cause.advice_text()
    assert list(f.evidence) == ["fraction", "advice"] and f.evidence["advice"] == cause.advice_dicts()


def test_a_kind_outside_the_catalogue_keeps_its_text_alone():
    f = explained_finding(
        step=0,
        kind="made_up",
        severity="critical",
        signal="x",
        value=1.0,
        baseline=0.5,
        evidence={"a": 1},
        text="x is high.",
    )
    assert (f.cause, f.advice, f.evidence) == ("x is high.", "", {"a": 1})
