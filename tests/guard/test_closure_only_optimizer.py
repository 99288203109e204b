"""keel.Guard around an optimizer whose step needs a closure (torch.optim.LBFGS): `Guard.step` calls
``optimizer.step()`` with no closure, so it is refused at construction with one ValueError, not a TypeError from
torch at the first step (reviewer V12)."""

from __future__ import annotations

import pytest
import torch

import keel


def test_guard_refuses_lbfgs_at_construction_naming_it_and_what_is_allowed(tmp_path) -> None:
    model = torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match=r"LBFGS\.step needs a closure.*allowed: an optimizer whose step"):
        keel.Guard(model, torch.optim.LBFGS(model.parameters(), lr=0.5), run_dir=str(tmp_path), policy="skip")
    assert not (tmp_path / "run.sqlite").exists()  # refused before the run_dir was claimed


def test_guard_takes_an_optimizer_whose_closure_is_optional(tmp_path) -> None:
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # an LR scheduler replaces optimizer.step by a wrapper whose signature reads (self, closure=None)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with keel.Guard(model, optimizer, run_dir=str(tmp_path), policy="skip") as guard:
        loss = model(torch.ones(2, 4)).square().mean()
        loss.backward()
        assert guard.step(loss).stepped


def test_keel_watch_refuses_lbfgs_too_instead_of_watching_nothing(tmp_path) -> None:
    # watch passed each step(closure) through unwatched: the run's summary then read "0 steps, no warning"
    model = torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match=r"LBFGS\.step needs a closure"):
        keel.watch(model, torch.optim.LBFGS(model.parameters(), lr=0.5), run_dir=str(tmp_path))


def test_guard_refuses_lbfgs_as_a_part_of_keel_optimizers(tmp_path) -> None:
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    parts = keel.Optimizers(torch.optim.SGD(first.parameters(), lr=0.1), torch.optim.LBFGS(second.parameters()))
    with pytest.raises(ValueError, match=r"LBFGS\.step needs a closure"):
        keel.Guard(torch.nn.Sequential(first, second), parts, run_dir=str(tmp_path))
