"""Every public argument of `Guard` and `Guard.step`: bad values get one ValueError naming the argument and what
is allowed; nothing else escapes (issue 12 item 12).
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keel
from keel import Guard, RecoveryConfig
from tests.conftest import TinyNet


def _guard(**kwargs):
    model = TinyNet()
    return Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


class _NoStep:
    def state_dict(self):
        return {}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scheduler="cosine"), r"scheduler='cosine'; allowed: None or an LR scheduler"),
        (dict(scheduler=_NoStep()), r"scheduler=.*_NoStep.*; allowed: None or an LR scheduler"),
        (dict(recovery="x"), r"recovery='x'; allowed: None or a keel.RecoveryConfig"),
        (dict(run_dir=123), r"run_dir=123; allowed: None, a str or an os.PathLike"),
        (dict(run_dir=""), r"run_dir=''; allowed: .*a folder path"),
        (dict(max_grad_norm="1"), r"max_grad_norm='1'; allowed: None or a finite number > 0"),
        (dict(max_grad_norm=math.nan), r"max_grad_norm=nan; allowed"),
        (dict(max_grad_norm=math.inf), r"max_grad_norm=inf; allowed"),
        (dict(max_grad_norm=True), r"max_grad_norm=True; allowed"),
        (dict(detectors=[object()]), r"detectors\[0\]=<object.*; allowed: .*name.*update.*state_dict"),
        (dict(detectors="spike"), r"detectors='spike'; allowed: None or a list of detectors"),
        (dict(log_every=True), r"log_every=True; allowed: an int >= 1"),
        (dict(log_every=2.0), r"log_every=2.0; allowed: an int >= 1"),
        (dict(scaler="amp"), r"scaler='amp'; allowed: None or a torch.amp.GradScaler"),
        (dict(resume="yes", run_dir="x"), r"resume='yes'; allowed: True or False"),
        (dict(seed="0"), r"seed='0'; allowed: None or an int"),
        (dict(seed=1.5), r"seed=1.5; allowed: None or an int"),
        (dict(config=[1, 2]), r"config=\[1, 2\]; allowed: None or a dict"),
        (dict(config={("a", 1): 2}), r"config=.*; allowed: None or a dict .*JSON"),
        (dict(distributed="yes"), r"distributed='yes'; allowed: None, True, False or a keel.DistributedConfig"),
        (dict(probes=[]), r"probes=\[\]; allowed: .*at least one"),
        (dict(probes=["loss", "loss"]), r"probes: two probes named 'loss'; allowed: unique names"),
        (dict(max_consecutive_skips=-1), r"max_consecutive_skips=-1; allowed: an int >= 1"),
        (dict(policy=None), r"policy=None; allowed: observe, skip, recover"),
        (dict(overwrite="no"), r"overwrite='no'; allowed: True or False"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _guard(**kwargs)


@pytest.mark.parametrize(
    "field,value",
    [
        ("rollback_margin", -1),
        ("quiet_steps", -1),
        ("cooldown_steps", -5),
        ("cooldown_steps", 0),
        ("snapshot_every", 0),
        ("keep_on_disk", True),
        ("lr_backoff", math.nan),
        ("lr_backoff", "0.1"),
        ("disk_every", 1.5),
        ("check_weights", "always"),
        ("check_weights", None),
        ("check_weights", True),
        ("check_weights", "Every_Update"),
    ],
)
def test_recovery_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"RecoveryConfig.{field}={value!r}; allowed"):
        RecoveryConfig(**{field: value})


def test_run_dir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"run_dir={str(path)!r} is a file; allowed: a folder"):
        _guard(run_dir=str(path))
    assert path.read_text() == "not a folder", "nothing lost"


def test_run_dir_that_cannot_be_created_is_a_clear_error():
    # /proc takes no new folders, even for root (who may write into a chmod-ed read-only folder anyway)
    with pytest.raises(ValueError, match=r"run_dir='/proc/keel-run' cannot be created .*; allowed: a folder keel"):
        _guard(run_dir="/proc/keel-run")


def test_run_dir_under_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"run_dir=.*a_file/run.*; allowed: a folder"):
        _guard(run_dir=str(path / "run"))


def test_pathlike_run_dir_is_accepted(tmp_path):
    guard = _guard(run_dir=tmp_path / "run")
    guard.close()
    assert (tmp_path / "run" / "run.sqlite").is_file()


@pytest.mark.parametrize(
    "loss,match",
    [
        (torch.tensor(1 + 2j), r"loss is a complex tensor; allowed: a real scalar"),
        ("1.0", r"loss=str; allowed: a scalar torch.Tensor or a float"),
        (None, r"loss=NoneType; allowed"),
        (True, r"loss=bool; allowed"),
        (torch.zeros(2), r"loss has shape \(2,\); allowed: a scalar"),
    ],
)
def test_bad_losses_are_clear_errors_and_nothing_is_stepped(loss, match):
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    F.mse_loss(model(torch.ones(2, 8)), torch.zeros(2, 4)).backward()
    with pytest.raises(ValueError, match=match):
        guard.step(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert guard.global_step == 0


def test_numpy_and_int_losses_are_accepted():
    import numpy as np

    guard = _guard()
    for loss in (np.float32(0.5), np.float64(0.5), 1, torch.tensor(3)):
        assert guard.step(loss).action == "ok"


def test_step_after_close_raises_and_does_not_step(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, run_dir=str(tmp_path))
    guard.close()
    F.mse_loss(model(torch.ones(2, 8)), torch.zeros(2, 4)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(keel.GuardClosed, match=r"Guard.step\(\) after close\(\)"):
        guard.step(0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --- property-based: any value for any argument gives a Guard or one ValueError naming the argument ---------
_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(object()),
    st.tuples(st.integers()),
    st.just(torch.tensor(1.0)),
)
_ARGS = [name for name in inspect.signature(Guard).parameters if name not in ("model", "optimizer")]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(_ARGS), value=_junk)
def test_any_value_for_any_argument_is_accepted_or_a_named_value_error(tmp_path_factory, name, value):
    if name == "run_dir" and isinstance(value, str) and value:
        value = str(tmp_path_factory.mktemp("run") / value.replace("/", "_").replace("\x00", "_"))
    try:
        guard = _guard(**{name: value})
    except ValueError as exc:
        assert f"{name}" in str(exc) and "allowed" in str(exc), str(exc)
        return
    guard.close()


@settings(max_examples=150, deadline=None)
@given(loss=_junk)
def test_any_loss_is_stepped_or_one_value_error(loss):
    guard = _guard()
    try:
        guard.step(loss)
    except ValueError as exc:
        assert "loss" in str(exc) and "allowed" in str(exc)
    finally:
        guard.close()


def test_track_after_the_first_step_is_refused(tmp_path):
    class Position:
        def __init__(self):
            self.i = 0

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, state):
            self.i = state["i"]

    guard = _guard()
    guard.track(Position())
    with pytest.raises(ValueError, match=r"track\(name=3\); allowed: a non-empty str"):
        guard.track(Position(), name=3)
    guard.step(0.5)
    late = r"track\('late'\) after 1 step\(s\) of this Guard: .*allowed: track\(\) before"
    with pytest.raises(ValueError, match=late):
        guard.track(Position(), name="late")


def test_a_resumed_run_starts_with_no_disabled_components(tmp_path):
    from keel.store import RunReader
    from tests.guard.test_component_failures import _ReturnsValue

    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(
        model,
        opt,
        run_dir=str(tmp_path),
        policy="recover",
        probes=["loss", _ReturnsValue("x")],
        recovery=RecoveryConfig(disk_every=1, snapshot_every=1),
    )
    for _ in range(3):
        F.mse_loss(model(torch.ones(2, 8)), torch.zeros(2, 4)).backward()
        guard.step(0.5)
        opt.zero_grad()
    guard.close()
    with RunReader(tmp_path) as run:
        assert run.meta()["disabled"] == ["custom"]
    guard = Guard(model, opt, run_dir=str(tmp_path), policy="recover", resume=True)
    guard.close()
    with RunReader(tmp_path) as run:
        assert run.meta()["disabled"] == []


def test_tracking_a_data_position_whose_state_is_empty_warns_that_nothing_will_be_restored(tmp_path):
    # guard.track(SkipListSampler(RandomSampler(...))) was accepted and its {} restored nothing: a resumed run
    # started the data over without a word (reviewer V9)
    from keel._core.errors import KeelWarning

    class NoPosition:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    class Position(NoPosition):
        def state_dict(self):
            return {"offset": 3}

    model = torch.nn.Linear(2, 1)
    guard = keel.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(KeelWarning, match=r"track\(NoPosition\): its state_dict\(\) is empty"):
        guard.track(NoPosition())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.track(Position(), name="other")
    guard.close()
