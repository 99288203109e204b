"""`Components.detect` calls a `keel.detect.scan.ReadsKeys` detector only on an observation that holds one of its keys
(its contract: one that holds none changes nothing). Before, every detector was called every step: on a 5-parameter
regression (pytorch/examples regression/main.py's shape) 14 of the 19 default detectors read signals the default
probes never measure (attention, MoE, evals, …), a large share of keel.watch's fixed cost per update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import keel
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel.guard.components import Components


class Counting:
    """A detector that says what it reads and counts its calls."""

    name = "counting"
    rests_when_finite = False

    def __init__(self, reads: tuple[str, ...]) -> None:
        self.reads, self.calls = reads, 0

    def update(self, obs: Observation) -> list[Finding]:
        self.calls += 1
        return []

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


class Undeclared:
    """Says nothing of what it reads: called every step."""

    name = "undeclared"

    def __init__(self) -> None:
        self.calls = 0

    def update(self, obs: Observation) -> list[Finding]:
        self.calls += 1
        return []


class RaisingReads(Counting):
    """Its ``reads`` raises: called every step (its own update, behind its fence, is what may fail)."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def reads(self) -> tuple[str, ...]:  # type: ignore[override]
        raise RuntimeError("reads is broken")


def _components(*detectors) -> tuple[Components, list]:
    errors: list = []
    return Components([], list(detectors), lambda *e: errors.append(e)), errors


def test_a_detector_is_called_only_on_observations_holding_a_key_it_reads():
    loss, attention, evals, family = (
        Counting(("loss",)),
        Counting(("attn/entropy",)),
        Counting(("eval/",)),
        Counting(("grad/norm/",)),
    )
    components, errors = _components(loss, attention, evals, family)
    components.detect(Observation(step=0, values={"loss": 1.0}))
    components.detect(Observation(step=1, values={"loss": 1.0, "eval/acc": 0.5}))  # a prefix family of values
    components.detect(Observation(step=2, values={"loss": 1.0}, per_param={"grad/norm/": (("w",), [1.0])}))
    components.detect(Observation(step=3, values={"attn/entropy": 2.0}))
    assert (loss.calls, attention.calls, evals.calls, family.calls) == (3, 1, 1, 1)
    assert errors == []


def test_a_detector_that_does_not_say_or_cannot_say_what_it_reads_is_called_every_step():
    undeclared, raising = Undeclared(), RaisingReads()
    components, errors = _components(undeclared, raising)
    for step in range(3):
        components.detect(Observation(step=step, values={"loss": 1.0}))
    assert (undeclared.calls, raising.calls) == (3, 3)
    assert errors == []


def test_a_detector_added_to_the_list_later_is_called():
    components, _ = _components(Counting(("x",)))
    components.detect(Observation(step=0, values={"loss": 1.0}))
    late = Counting(("loss",))
    components.detectors.append(late)
    components.detect(Observation(step=1, values={"loss": 1.0}))
    assert late.calls == 1


def test_in_a_guard_the_default_detectors_of_signals_not_measured_are_not_called():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.Guard(model, opt, policy="observe")
    called: dict[str, int] = {}
    for detector in guard.detectors:
        update = detector.update

        def counted(obs, update=update, name=detector.name):
            called[name] = called.get(name, 0) + 1
            return update(obs)

        detector.update = counted  # type: ignore[method-assign]
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        guard.step(model(torch.randn(8, 4)).pow(2).mean())
        opt.zero_grad()
    guard.close()
    assert called["spike"] == 6 and called["divergence"] == 3 and called["non_finite"] == 3
    assert "attention_entropy_collapse" not in called and "dead_experts" not in called


@pytest.mark.parametrize("reads", ["attn/entropy", [1, 2], None, ("attn/entropy", 3), 5], ids=repr)
def test_a_detector_whose_reads_is_not_a_list_of_keys_is_called_every_step(reads):
    odd = Counting(())
    odd.reads = reads  # type: ignore[assignment]
    components, errors = _components(odd)
    for step in range(2):
        components.detect(Observation(step=step, values={"loss": 1.0}))
    assert odd.calls == 2 and errors == []
