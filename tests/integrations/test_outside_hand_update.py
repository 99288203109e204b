"""pytorch/examples' word_language_model/main.py updates the parameters by hand (``p.data.add_(p.grad, alpha=-lr)``
after ``clip_grad_norm_``). A user who adds ``keel.watch(model, torch.optim.SGD(...))`` as the README says, but keeps
that update, never calls the SGD's ``step()``: keel then judges nothing. It said only "run finished after 0 steps, no
warning or critical finding" while the run's weights had turned NaN. It now says, at the first gradients the loop
drops without a step, that the loop updates the parameters some other way and what to do."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import keel
from keel._core.errors import KeelWarning

TEXT = ((torch.__doc__ or "") + (nn.Module.__doc__ or "")).encode()[:600]


def _hand_updated_loop(*, opt_steps: bool, zero_grad: bool = True, batches: int = 12) -> None:
    """main.py's train(): zero_grad, forward, backward, clip, then the update by hand (or the SGD's step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(256, 8), nn.Linear(8, 256))
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    tokens = torch.tensor(list(TEXT), dtype=torch.long)
    with keel.watch(model, opt, policy="skip"):
        for i in range(batches):
            x, y = tokens[i * 16 : i * 16 + 16], tokens[i * 16 + 1 : i * 16 + 17]
            if zero_grad:
                model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            if opt_steps:
                opt.step()
            else:
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-20.0)


def test_a_loop_that_updates_by_hand_and_never_steps_the_optimizer_is_told_so():
    with pytest.warns(KeelWarning, match=r"never called.*p\.data\.add_.*opt\.step\(\)") as caught:
        _hand_updated_loop(opt_steps=False)
    assert sum("never called" in str(w.message) for w in caught) == 1  # once, not per batch
    assert caught[0].filename == __file__  # at the loop's line


def test_gradients_accumulated_without_zero_grad_and_no_step_are_told_so_at_close():
    with pytest.warns(KeelWarning, match="never called"):
        _hand_updated_loop(opt_steps=False, zero_grad=False, batches=3)


def test_the_same_loop_with_the_optimizers_step_is_not_warned_about():
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)
        _hand_updated_loop(opt_steps=True)
