"""The activation-growth detector: rising block outputs flagged before they reach the precision's max, nothing else."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation, keys
from keel.detect import ActivationGrowthConfig, ActivationGrowthDetector, default_detectors
from keel.signals.registry import DEFAULT_PROBES, TRANSFORMER_PROBES

BLOCKS = ("blocks.0", "blocks.1")


def _act(step, top, *, blocks=None, headroom=None):
    values = {keys.ACT_MAX_ABS: top}
    if headroom is not None:
        values[keys.NUMERICS_HEADROOM] = headroom
    per_param = {keys.ACT_MAX_ABS_PER_BLOCK: (BLOCKS, blocks)} if blocks is not None else {}
    return Observation(step=step, values=values, per_param=per_param)


def _run(det, observations):
    return [f for o in observations for f in det.update(o)]


def _growing(n=80, start=50.0, rate=1.1):
    return [start] * 20 + [start * rate**k for k in range(1, n)]


def test_growth_towards_fp16_max_warns_then_is_critical_before_the_overflow():
    series = _growing()  # 50 · 1.1^k: 1024 (6 doublings left) at step 52, 32752 at 88, 65504 at 95
    found = _run(ActivationGrowthDetector(), [_act(s, v) for s, v in enumerate(series)])
    assert [(f.step, f.kind, f.severity) for f in found] == [
        (53, "activation_growth", "warning"),
        (88, "activation_growth", "critical"),
    ]
    warning = found[0]
    overflow = next(s for s, v in enumerate(series) if v > 65504.0)
    assert warning.evidence["projected_critical_step"] == pytest.approx(overflow, abs=3)  # the max, projected
    assert warning.evidence["rate_doublings_per_step"] == pytest.approx(math.log2(1.1), abs=1e-5)  # rounded to 5 places
    assert warning.evidence["source"] == keys.ACT_MAX_ABS and warning.evidence["format_max"] == 65504.0
    assert warning.value == pytest.approx(series[53]) and warning.signal == keys.ACT_MAX_ABS
    assert "overflow" in warning.cause and warning.advice  # the catalogue's mechanism and advice


def test_large_but_steady_activations_never_alarm():
    rng = np.random.default_rng(0)  # "massive activations": 40000 (under 1 doubling from fp16's max), noisy, flat
    series = 40000.0 * np.exp(0.05 * rng.standard_normal(400))
    assert _run(ActivationGrowthDetector(), [_act(s, float(v)) for s, v in enumerate(series)]) == []


def test_slow_growth_that_would_take_longer_than_the_horizon_is_not_an_alarm():
    series = [2000.0 * 1.002**k for k in range(600)]  # 5 doublings left, ×2 every 347 steps: ~1700 steps away
    assert _run(ActivationGrowthDetector(), [_act(s, v) for s, v in enumerate(series)]) == []


def test_the_finding_names_the_block_with_the_largest_output():
    series = _growing()
    obs = [_act(s, v, blocks=[v / 3, v]) for s, v in enumerate(series)]
    found = _run(ActivationGrowthDetector(), obs)
    assert found and {f.evidence["block"] for f in found} == {"blocks.1"}
    assert found[0].cause.startswith("Activations in blocks.1 are")


def test_numerics_headroom_comes_first_when_logged():
    # act/max_abs grows towards fp16's max, but the numerics probe measures bf16 tensors (~110 doublings left)
    series = _growing()
    det = ActivationGrowthDetector()
    assert _run(det, [_act(s, v, headroom=127.0 - math.log2(v)) for s, v in enumerate(series)]) == []
    # once the numerics headroom has been seen, the activation probe's own steps never mix into its series
    assert _run(det, [_act(100 + s, v) for s, v in enumerate(series)]) == []


def test_numerics_headroom_replaces_the_activation_series_from_its_first_measurement():
    # a numerics probe measuring every 10 steps from step 5, next to the activation probe every step: a bf16 model
    # whose act/max_abs grows towards 65504 but whose real headroom stays ~110 doublings
    det = ActivationGrowthDetector()
    obs = [_act(s, v, headroom=127.0 - math.log2(v) if s % 10 == 5 else None) for s, v in enumerate(_growing())]
    assert _run(det, obs) == []
    assert det.state_dict()["source"] == keys.NUMERICS_HEADROOM


def test_numerics_headroom_growth_is_flagged_with_the_tensor_it_names():
    names = ("act/blocks.0", "grad/head.weight")
    obs = [
        Observation(
            step=s,
            values={keys.NUMERICS_HEADROOM: math.log2(65504.0 / v)},
            per_param={keys.NUMERICS_HEADROOM_PER_NAME: (names, [math.log2(65504.0 / v), 30.0])},
        )
        for s, v in enumerate(_growing())
    ]
    found = _run(ActivationGrowthDetector(), obs)
    assert [(f.step, f.severity) for f in found] == [(53, "warning"), (88, "critical")]
    assert found[0].signal == keys.NUMERICS_HEADROOM and found[0].evidence["block"] == "act/blocks.0"
    assert "format_max" not in found[0].evidence


def test_silent_and_unchanged_without_its_keys():
    det = ActivationGrowthDetector()
    _run(det, [_act(s, v) for s, v in enumerate(_growing()[:30])])
    before = det.state_dict()
    assert det.update(Observation(step=31, values={"loss": 2.0, "grad/norm": 1.0})) == []
    assert det.state_dict() == before


def test_in_the_default_detectors_while_its_probe_is_opt_in():
    assert "activation_growth" in {d.name for d in default_detectors()}
    # the activation probe is not a default probe: a Guard with default probes logs no act/* key, so it stays silent
    assert "activation_rms" not in DEFAULT_PROBES and "activation_rms" in TRANSFORMER_PROBES


def test_state_round_trip_continues_identically():
    series = _growing()
    obs = [_act(s, v) for s, v in enumerate(series)]
    det = ActivationGrowthDetector()
    _run(det, obs[:50])
    state = json.loads(json.dumps(det.state_dict()))
    other = ActivationGrowthDetector()
    other.load_state_dict(state)
    assert _run(other, obs[50:]) == _run(det, obs[50:])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("format_max", 0.0),
        ("format_max", math.inf),
        ("format_max", math.nan),
        ("window", 2),
        ("min_points", 30),
        ("warn_headroom", -1.0),
        ("critical_headroom", 7.0),
        ("horizon", 0),
        ("patience", 0),
        ("patience", 1.5),
    ],
)
def test_config_names_the_bad_field_and_the_allowed_values(field, value):
    with pytest.raises((ValueError, TypeError), match=f"{field}"):
        ActivationGrowthConfig(**{field: value})


def test_a_state_with_an_unknown_source_is_refused():
    state = ActivationGrowthDetector().state_dict()
    with pytest.raises(ValueError, match="source='loss'.*allowed"):
        ActivationGrowthDetector().load_state_dict({**state, "source": "loss"})


HOSTILE = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e300, 1e-300]),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(tops=st.lists(HOSTILE, max_size=60), headrooms=st.lists(st.one_of(st.none(), HOSTILE), max_size=60))
def test_hostile_values_never_raise_and_findings_are_well_formed(tops, headrooms):
    det = ActivationGrowthDetector()
    for step, top in enumerate(tops):
        h = headrooms[step] if step < len(headrooms) else None
        for f in det.update(_act(step, top, headroom=h)):
            assert f.kind == "activation_growth" and f.severity in ("warning", "critical")
            assert f.evidence["headroom_doublings"] <= 6.0 and f.evidence["rate_doublings_per_step"] > 0
            json.dumps(f.evidence)


# --- the zoo's fp16 runs (tests/detect/data/record_activation_series.py records what the Guard's detector read) ---
SERIES = json.loads((Path(__file__).parent / "data" / "activation_series.json").read_text())
# live runs (`create_scenario(name).run(seed=s)`): the activation_growth warning and critical steps, the first NaN loss
LIVE = {0: (21, 119, 149), 1: (22, 82, 224), 2: (23, 107, 129)}


def _replay(run):
    obs = [_act(s, math.nan if v is None else v) for s, v in zip(run["steps"], run["act_max_abs"], strict=True)]
    return _run(ActivationGrowthDetector(), obs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_zoo_fp16_overflow_runs_are_flagged_before_their_first_non_finite_loss(seed):
    run = SERIES[f"fp16_overflow/{seed}"]
    found = _replay(run)
    warning, critical, nan_step = LIVE[seed]
    assert run["first_nonfinite_loss"] == nan_step
    assert [(f.step, f.severity) for f in found] == [(warning, "warning"), (critical, "critical")]
    assert found[-1].step < nan_step


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_zoo_healthy_fp16_runs_raise_nothing(seed):
    run = SERIES[f"fp16_healthy/{seed}"]
    assert run["first_nonfinite_loss"] is None and len(run["steps"]) == 300
    assert _replay(run) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["fp16_overflow", "fp16_healthy"])
def test_fp16_scenarios_pass_the_zoo_score(name, seed):
    from keel.harness.bench.detect import score_scenario  # noqa: PLC0415  (the harness, only for this slow run)

    score = score_scenario(name, seed=seed)
    assert score.passed, (name, seed, score.alarms)
    if name == "fp16_overflow":
        assert (score.kind, score.step) == ("activation_growth", LIVE[seed][0])


@pytest.mark.slow  # importing the scenario zoo takes seconds
def test_the_fp16_scenarios_differ_only_in_the_learning_rate():
    from keel.harness.scenarios import create_scenario  # noqa: PLC0415
    from keel.harness.scenarios.fp16_overflow import autocast_fp16  # noqa: PLC0415

    bad, good = create_scenario("fp16_overflow").recipe(0), create_scenario("fp16_healthy").recipe(0)
    assert bad.model_fn is autocast_fp16 and (bad.lr, good.lr) == (0.1, 0.01)
    assert replace(bad, lr=good.lr) == good


def test_the_format_the_probe_reports_is_the_limit_so_a_float32_run_never_warns():
    # the demo's healthy fp32 arm: activations of ~1500 still growing were judged against fp16's max before the
    # activation probe said which format its outputs are held in
    series = _growing()

    def run(held=None, **config):
        observations = []
        for s, v in enumerate(series):
            obs = _act(s, v)
            if held is not None:
                obs.values[keys.ACT_FORMAT_MAX] = held
            observations.append(obs)
        return _run(ActivationGrowthDetector(**config), observations)

    assert run(3.4028234663852886e38) == []  # float32 (and bfloat16's near-equal range): ~118 doublings left
    fp16 = run(65504.0)
    assert [(f.step, f.severity) for f in fp16] == [(53, "warning"), (88, "critical")]
    assert "format_assumed" not in fp16[0].evidence
    assumed = run()  # a log that does not say (an older keel): fp16, the narrowest, said in the finding
    assert [(f.step, f.severity) for f in assumed] == [(53, "warning"), (88, "critical")]
    assert assumed[0].evidence["format_assumed"] is True
    assert run(3.4028234663852886e38, format_max=65504.0)[0].step == 53  # the config wins: "how would fp16 fare"


def _numerics(step, members):
    """A recorded numerics-probe step: the headline (min over every member, as the probe writes it) and the family."""
    names, values = tuple(members), [float(v) for v in members.values()]
    return Observation(
        step=step,
        values={keys.NUMERICS_HEADROOM: min(values)},
        per_param={keys.NUMERICS_HEADROOM_PER_NAME: (names, values)},
    )


def _falling(n=100, start=8.0, rate=0.1):
    """Headroom in doublings: flat at ``start`` for 20 steps, then falling by ``rate`` a step towards and past 0."""
    return [start] * 20 + [start - rate * k for k in range(1, n)]


def test_a_scaled_gradient_near_the_max_is_not_an_activation_alarm():
    # NumericsProbe(scaler=) judges gradients at the GradScaler's scale: they sit near fp16's max by design, and the
    # scale grows until it overflows. Only the gradient member falls; the activations keep 12 doublings.
    obs = [
        _numerics(s, {"act/blocks.0": 12.0, "logits/head": 14.0, "grad/head.weight": h})
        for s, h in enumerate(_falling())
    ]
    assert _run(ActivationGrowthDetector(), obs) == []


def test_an_activation_member_near_the_max_warns_and_is_named_beside_a_worse_gradient():
    # the same fall in an activation member warns, and names it even where a scaled gradient has less headroom
    obs = [
        _numerics(s, {"act/blocks.0": h, "logits/head": 14.0, "grad/head.weight": h - 1.0})
        for s, h in enumerate(_falling())
    ]
    found = _run(ActivationGrowthDetector(), obs)
    assert [f.severity for f in found] == ["warning", "critical"]
    assert {f.evidence["block"] for f in found} == {"act/blocks.0"}
    assert found[0].evidence["headroom_doublings"] <= 6.0 and found[0].value == found[0].evidence["headroom_doublings"]


def test_a_logits_member_counts_as_an_activation():
    obs = [_numerics(s, {"act/blocks.0": 12.0, "logits/head": h}) for s, h in enumerate(_falling())]
    found = _run(ActivationGrowthDetector(), obs)
    assert [f.severity for f in found] == ["warning", "critical"] and found[0].evidence["block"] == "logits/head"


def test_a_recorded_step_without_the_family_does_not_mix_the_gradient_headline_in():
    # stored logs keep the family on log_every steps only; the headline of the other steps includes the gradients
    obs = []
    for s, h in enumerate(_falling()):
        step = _numerics(s, {"act/blocks.0": 12.0, "grad/head.weight": h})
        obs.append(step if s % 10 == 0 else Observation(step=s, values=dict(step.values)))
    assert _run(ActivationGrowthDetector(), obs) == []
