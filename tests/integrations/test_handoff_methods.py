"""keel's gate on ``optimizer.step`` is a bound method, as torch's LR schedulers expect (reviewer V15 of session 13:
a scheduler built after ``keel.watch`` — the placement its docstring gives — raised AttributeError in torch)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel.integrations._handoff import Handoff


def test_a_scheduler_built_after_watch_steps_the_gated_optimizer_and_a_skip_holds():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watch = keel.watch(model, optimizer, policy="skip")
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # raised before
    actions = []
    for step in range(4):
        loss = F.mse_loss(model(torch.randn(8, 4)), torch.zeros(8, 1))
        (loss * float("nan") if step == 2 else loss).backward()
        before = model.weight.detach().clone()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        actions.append(torch.equal(before, model.weight))
    assert actions == [False, False, True, False]  # the NaN step was skipped through torch's wrapper
    assert [d.action for d in watch.decisions if d.action != "ok"] == ["skip"]
    watch.close()
    before = model.weight.detach().clone()
    F.mse_loss(model(torch.randn(8, 4)), torch.zeros(8, 1)).backward()
    optimizer.step()  # after close, torch's wrapper on top of the restored-away gate passes straight through
    assert not torch.equal(before, model.weight)


def test_a_gate_on_a_class_or_module_stays_a_plain_function():
    class Box:
        def value(self):
            return 1

    handoff, box = Handoff(), Box()
    handoff.gate(Box, "value", lambda original, *a: original(*a) + 10)
    handoff.gate(box, "value", lambda original, *a: original(*a) + 100)
    assert Box().value() == 11 and box.value() == 111
    handoff.restore()
    assert Box().value() == 1 and box.value() == 1


def test_two_handoffs_restored_in_the_order_they_gated_leave_the_original_behind():
    """A GAN's two watches closed D first, then G: G's restore put D's gate back in Tensor.backward for good."""

    class Box:
        def value(self):
            return 1

    original = Box.value
    first, second = Handoff(), Handoff()
    first.gate(Box, "value", lambda o, *a: o(*a) + 10)
    second.gate(Box, "value", lambda o, *a: o(*a) + 100)
    assert Box().value() == 111
    first.restore()  # not on top: left in place, passing calls through
    assert Box().value() == 101
    second.restore()
    assert Box.value is original and Box().value() == 1


def test_a_scheduler_built_after_watch_and_not_given_to_it_is_warned_about_at_the_first_update():
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = keel.watch(model, optimizer, policy="skip")
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        for _ in range(2):
            F.mse_loss(model(torch.randn(8, 4)), torch.zeros(8, 1)).backward()
            optimizer.step()
            optimizer.zero_grad()
    watch.close()
    said = [str(w.message) for w in caught if "LR scheduler keel was not given" in str(w.message)]
    assert len(said) == 1  # once, at the first update (the watch line came before the scheduler)
