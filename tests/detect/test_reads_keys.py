"""Every detector that declares the keys it reads keeps the promise `keel.detect.scan.ReadsKeys` makes.

`keel doctor` leans on it to skip observations: a detector must not change on an observation holding none of
its keys, and one that rests when finite must be at rest — no findings, the same state from any history —
after an observation whose read values are all finite.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core.observation import Observation
from keel.detect import default_detectors
from keel.detect.scan import ReadsKeys

DECLARING = [d for d in default_detectors() if isinstance(d, ReadsKeys)]
MEMBERS = ("blocks.0", "blocks.1", "head.weight")
OTHER_KEYS = ("epoch", "tokens", "val/loss", "time/step")  # keys no detector of the default set reads
NUMBERS = st.one_of(
    st.floats(min_value=-5, max_value=80), st.sampled_from([0.0, 1.0, math.nan, math.inf, -math.inf, 0.99, 0.5])
)
FINITE = st.floats(min_value=-5, max_value=80)


def _observation(draw, step, reads, numbers):
    values, per_param = {}, {}
    for key in draw(st.lists(st.sampled_from(reads), unique=True)):
        if key.endswith("/"):
            per_param[key] = (MEMBERS, [draw(numbers) for _ in MEMBERS])
        else:
            values[key] = draw(numbers)
    values.update({k: draw(FINITE) for k in draw(st.lists(st.sampled_from(OTHER_KEYS), unique=True))})
    return Observation(step=step, values=values, per_param=per_param)


def _fresh(det):
    return next(d for d in default_detectors() if d.name == det.name)


def test_the_predictive_and_non_finite_detectors_declare_their_keys():
    assert {d.name for d in DECLARING} == {
        "non_finite",
        "non_finite_origin",
        "attention_logit_growth",
        "attention_entropy_collapse",
        "output_logit_drift",
        "softmax_collapse",
        "edge_of_stability",
        "eps_dominance",
        "loss_scale_thrash",
        "lr_surge",
        "norm_stats_jump",
        "qat_oscillation",
        "activation_growth",
        "lora_blowup",
        "stability_gap",
        "router_logit_growth",
        "load_collapse",
        "dead_experts",
    }


@pytest.mark.parametrize("template", DECLARING, ids=lambda d: d.name)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_an_observation_without_its_keys_changes_nothing(template, data):
    det = _fresh(template)
    for step in range(data.draw(st.integers(0, 40))):
        det.update(_observation(data.draw, step, det.reads, NUMBERS))
    before = det.state_dict()
    unrelated = Observation(step=99, values={k: data.draw(FINITE) for k in OTHER_KEYS})
    found = det.update(unrelated)
    assert found == []
    if not det.rests_when_finite:
        assert det.state_dict() == before


@pytest.mark.parametrize("template", [d for d in DECLARING if d.rests_when_finite], ids=lambda d: d.name)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_a_finite_observation_leaves_it_at_rest_whatever_came_before(template, data):
    det, rested = _fresh(template), _fresh(template)
    for step in range(data.draw(st.integers(0, 40))):
        det.update(_observation(data.draw, step, det.reads, NUMBERS))
    quiet = _observation(data.draw, 99, det.reads, FINITE)
    assert det.update(quiet) == []
    rested.update(quiet)
    assert det.state_dict() == rested.state_dict()
