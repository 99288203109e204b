"""A failing keel component disables exactly itself; the rest of the Guard keeps protecting the run.

Issue 12 item 4: a custom probe returning a float or a str made every step's measurement fail, was recorded
against "guard" on every step and never disabled, so a later NaN loss went through and the weights became NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from keel import Guard
from keel.store import RunReader
from tests.conftest import TinyNet, make_batches


class _ReturnsValue:
    """A custom probe whose measurement is not a tensor."""

    def __init__(self, value: object, name: str = "custom") -> None:
        self.value, self.name = value, name

    def measure(self, ctx):
        return {"custom/value": self.value}

    def after_step(self, ctx):
        return {}


class _BadAfterStep:
    name = "bad_after"

    def measure(self, ctx):
        return {}

    def after_step(self, ctx):
        return {"bad/after": "not a tensor"}


class _AttachFails:
    name = "attach_fails"

    def attach(self, model):
        raise RuntimeError("cannot hook this model")

    def measure(self, ctx):
        raise AssertionError("a probe whose attach failed must never be measured")

    def after_step(self, ctx):
        return {}


class _StateDictFails:
    """A detector that works but whose state cannot be captured (snapshots call state_dict)."""

    name = "stateless"

    def __init__(self) -> None:
        self.updates = 0

    def update(self, obs):
        self.updates += 1
        return []

    def state_dict(self):
        raise TypeError("cannot copy my state")

    def load_state_dict(self, state):
        raise TypeError("cannot load my state")


class _ReturnsJunk:
    """A detector whose update returns something that is not a list of Findings."""

    name = "junk"

    def update(self, obs):
        return ["not a finding"]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _run(probes="default", detectors=None, nan_at=12, steps=16, policy="skip", **kwargs):
    """TinyNet under ``policy``; the loss (and so every gradient) at step ``nan_at`` is NaN."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if isinstance(probes, list):
        from keel.signals import DEFAULT_PROBES, create_probe

        probes = [create_probe(p) for p in DEFAULT_PROBES] + probes
    if detectors is not None:
        from keel.detect import default_detectors

        detectors = default_detectors() + detectors
    guard = Guard(model, opt, policy=policy, probes=probes, detectors=detectors, **kwargs)
    for step, (x, y) in enumerate(make_batches(steps)):
        loss = F.mse_loss(model(x), y)
        if step == nan_at:
            loss = loss * math.nan
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return model, guard


def _errors(guard):
    return [f for f in guard.findings if f.kind == "keel_error"]


def _finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "value",
    [1.0, "text", None, [1.0, 2.0], torch.ones(3), torch.tensor([1 + 2j])],
    ids=["float", "str", "None", "list", "vector", "complex"],
)
def test_a_probe_returning_junk_is_disabled_and_the_nan_step_is_still_skipped(value):
    model, guard = _run(probes=[_ReturnsValue(value)])
    assert _finite(model), "the NaN step went through: the bad probe switched the whole Guard off"
    assert [d.action for d in guard.decisions] == ["skip"]
    errors = _errors(guard)
    assert len(errors) == 1, "one keel_error for the probe, not one per step"
    assert errors[0].signal == "custom" and "disabled" in errors[0].cause


def test_a_probe_whose_after_step_returns_junk_is_disabled_alone():
    model, guard = _run(probes=[_BadAfterStep()])
    assert _finite(model) and [d.action for d in guard.decisions] == ["skip"]
    assert [e.signal for e in _errors(guard)] == ["bad_after"]


def test_a_probe_whose_attach_fails_is_disabled_and_guard_is_built():
    model, guard = _run(probes=[_AttachFails()])
    assert _finite(model) and [d.action for d in guard.decisions] == ["skip"]
    errors = _errors(guard)
    assert [e.signal for e in errors] == ["attach_fails"] and "cannot hook" in errors[0].cause


def test_a_detector_returning_junk_is_disabled_alone():
    model, guard = _run(detectors=[_ReturnsJunk()])
    assert _finite(model) and [d.action for d in guard.decisions] == ["skip"]
    assert [e.signal for e in _errors(guard)] == ["detector:junk"]


def test_a_detector_whose_state_cannot_be_copied_is_disabled_once_and_snapshots_go_on():
    bad = _StateDictFails()
    model, guard = _run(detectors=[bad], policy="recover", steps=60, nan_at=40)
    assert _finite(model) and [d.action for d in guard.decisions] == ["skip"]
    errors = _errors(guard)
    assert [e.signal for e in errors] == ["detector:stateless"], "recorded once, not on every snapshot"
    assert "cannot copy my state" in errors[0].cause
    assert bad.updates == 0, "disabled at the starting snapshot, before the first step: never updated"
    assert guard.recovery is not None and len(guard.recovery.ring.snapshots) >= 2, "snapshots went on without it"


def test_a_detector_whose_state_is_never_copied_keeps_working_under_skip():
    bad = _StateDictFails()
    _, guard = _run(detectors=[bad], policy="skip", steps=20)
    assert bad.updates == 20 and _errors(guard) == []


def test_disabled_components_are_recorded_in_the_store(tmp_path):
    _, guard = _run(probes=[_ReturnsValue("text")], run_dir=str(tmp_path))
    with RunReader(tmp_path) as run:
        assert [f.signal for f in run.findings() if f.kind == "keel_error"] == ["custom"]
        assert run.meta()["disabled"] == ["custom"]
        steps, loss = run.signal("loss")
        assert len(steps) == 16


def test_a_guard_step_failing_on_every_step_is_counted_in_the_summary_and_the_store(tmp_path, caplog):
    """One keel_error finding says the first failure; the run's end says how many steps went unguarded."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = Guard(model, opt, policy="skip", run_dir=str(tmp_path))

    def broken(step, findings):  # a keel bug in the decision: the step's checks fail, the loop goes on
        raise RuntimeError("a bug in the decision")

    guard.escalation.decide = broken
    with caplog.at_level("INFO", logger="keel"):
        for x, y in make_batches(7):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
        guard.close()
    assert [f.signal for f in _errors(guard)] == ["guard"]
    assert guard.components.failures == {"guard": 7}
    assert "keel error: guard failed on 7 steps; those steps went on unguarded" in caplog.text
    with RunReader(tmp_path) as run:
        assert run.meta()["keel_errors"] == {"guard": 7}


def test_a_run_without_keel_errors_says_none_in_its_summary(caplog):
    with caplog.at_level("INFO", logger="keel"):
        _, guard = _run()
    assert guard.components.failures == {}
    assert "keel error" not in caplog.text


GLOO_RESET = "[gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:41502: Connection reset by peer"


@pytest.mark.parametrize(
    "exc, lost",
    [
        (RuntimeError(GLOO_RESET), True),  # a survivor's all-reduce when its peer was SIGKILLed (helper A's F3)
        (RuntimeError("NCCL error: remote process exited, Connection closed by peer"), True),
        (torch.distributed.DistNetworkError("the store's socket closed"), True),
        # a rank late past the timeout (session 18, helper B: the advice said "report this as a keel bug")
        (RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms for recv operation"), True),
        (RuntimeError("Application timeout caused pair closure"), True),
        (RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(OpType=ALLREDUCE)"), True),
        (RuntimeError("keel's collectives stopped after one failed (RuntimeError: ...): none is made any more"), True),
        (RuntimeError("gloo: size mismatch in all_reduce"), False),  # keel's own misuse is still a keel bug
        (ValueError("Connection reset by peer"), False),
        (RuntimeError(""), False),
    ],
)
def test_a_rank_lost_mid_collective_is_not_called_a_keel_bug(exc, lost):
    from keel.guard.recorder import PEER_LOST, Recorder, a_peer_was_lost

    assert a_peer_was_lost(exc) is lost
    finding = Recorder(None, log_every=1).error("guard", 25, exc, disabled=False)
    assert (finding.advice == PEER_LOST) is lost
    assert ("keel bug" in finding.advice) is not lost
