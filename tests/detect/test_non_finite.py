import math

from keel._core import Observation, keys
from keel.detect.non_finite import NonFiniteConfig, NonFiniteDetector

NAN, INF = float("nan"), float("inf")


def _obs(step=0, loss=1.0, grad=1.0, per=None, scale=None, param=None):
    values = {keys.LOSS: loss, keys.GRAD_NORM: grad}
    if scale is not None:
        values[keys.AMP_SCALE] = scale
    if param is not None:
        values[keys.PARAM_NORM] = param
    per_param = {keys.GRAD_NORM_PER_PARAM: per} if per else {}
    return Observation(step=step, values=values, per_param=per_param)


def test_finite_is_silent():
    assert NonFiniteDetector().update(_obs()) == []


def test_nan_gradient_names_the_parameters():
    per = (("a.weight", "b.weight", "c.bias"), [1.0, NAN, INF])
    [f] = NonFiniteDetector().update(_obs(step=7, grad=NAN, per=per))
    assert (f.step, f.kind, f.severity, f.signal) == (7, "non_finite", "critical", "grad/norm")
    assert f.evidence["parameters"] == ["b.weight", "c.bias"] and f.evidence["count"] == 2
    assert "b.weight" in f.cause


def test_nan_loss_alone_is_caught():
    [f] = NonFiniteDetector().update(_obs(loss=NAN))
    assert f.signal == "loss" and f.severity == "critical"
    assert math.isnan(f.value)


def test_scaler_overflow_is_info_until_it_repeats():
    det = NonFiniteDetector(NonFiniteConfig(max_overflows=3))
    per = (("w",), [INF])
    kinds = [det.update(_obs(step=s, grad=INF, per=per, scale=65536.0))[0] for s in range(3)]
    assert [(f.kind, f.severity) for f in kinds] == [("loss_scale_overflow", "info")] * 2 + [("non_finite", "critical")]
    assert det.update(_obs(step=3, scale=1024.0)) == []
    assert det.update(_obs(step=4, grad=INF, per=per, scale=512.0))[0].severity == "info"  # counter reset


def test_non_finite_parameters_are_critical_even_with_a_scaler():
    [f] = NonFiniteDetector().update(_obs(param=NAN, scale=1.0))
    assert f.kind == "non_finite" and f.severity == "critical" and "Parameters" in f.cause


def test_non_finite_parameters_at_the_first_observation_blame_the_initialisation_not_an_update():
    # a model NaN before training was told "an earlier update was applied with non-finite values" and to roll back
    # (helper B, reviewer V8's case): there was no update, and no older snapshot
    nan = float("nan")
    first = NonFiniteDetector()
    (finding,) = first.update(Observation(step=0, values={keys.LOSS: nan, keys.PARAM_NORM: nan}))
    assert "before any update was applied" in finding.cause and "initialisation" in finding.advice
    later = NonFiniteDetector()
    later.update(Observation(step=0, values={keys.LOSS: 2.0, keys.PARAM_NORM: 10.0}))
    (finding,) = later.update(Observation(step=1, values={keys.LOSS: nan, keys.PARAM_NORM: nan}))
    assert "an earlier update was applied" in finding.cause and "Roll back" in finding.advice
    resumed = NonFiniteDetector()
    resumed.load_state_dict(later.state_dict())
    (finding,) = resumed.update(Observation(step=2, values={keys.PARAM_NORM: nan}))
    assert "an earlier update was applied" in finding.cause
