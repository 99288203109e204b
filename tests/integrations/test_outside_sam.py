"""davda54/sam's SAM (the most used SAM implementation; its class copied here in shape) in its README's loop:
backward, ``first_step(zero_grad=True)``, a second backward, ``second_step(zero_grad=True)``, which steps
``base_optimizer``. keel.watch(model, sam.base_optimizer) guards it, yet warned "never called step() … keel judges
nothing": first_step's zero_grad drops the first backward's gradients before the first update, which was read as a loop
that updates by hand. keel.watch(model, sam) guards nothing, and its warning pointed to word_language_model's hand
update instead of ``optimizer.base_optimizer`` (reviewer V6 of session 14)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel._core.errors import KeelWarning

NAN_AT = 5


class SAM(torch.optim.Optimizer):
    """davda54/sam's sam.py, as published (trimmed of load_state_dict)."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_((torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is not None, "Sharpness Aware Minimization requires closure, but it was not provided"
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def _grad_norm(self):
        norms = [
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return torch.norm(torch.stack(norms), p=2)


def _sam_loop(watched: str, *, closure_form: bool = False, steps: int = 10):
    """The README's loop (or its ``optimizer.step(closure)`` form); a NaN in a gradient of the second backward at
    NAN_AT. Returns the watch, the KeelWarnings' texts and whether the weights are finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with keel.watch(model, sam if watched == "sam" else sam.base_optimizer, policy="skip") as guard:
            for step in range(steps):
                x, y = torch.randn(16, 8), torch.randn(16, 1)

                def second_backward(x=x, y=y, step=step):
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    if step == NAN_AT:
                        model[0].weight.grad[0, 0] = float("nan")
                    return loss

                F.mse_loss(model(x), y).backward()
                if closure_form:
                    sam.step(second_backward)
                    sam.zero_grad()
                else:
                    sam.first_step(zero_grad=True)
                    second_backward()
                    sam.second_step(zero_grad=True)
    said = [str(w.message) for w in caught if issubclass(w.category, KeelWarning)]
    return guard, said, all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("closure_form", [False, True])
def test_the_base_optimizer_watched_guards_sam_without_a_warning(closure_form):
    guard, said, finite = _sam_loop("base", closure_form=closure_form)
    assert said == []  # before: "never called step() … keel judges nothing", while keel judged every update
    assert guard.global_step == 10 and [(d.step, d.action) for d in guard.decisions] == [(NAN_AT, "skip")]
    assert finite


@pytest.mark.parametrize("closure_form", [False, True])
def test_sam_itself_watched_is_told_to_give_keel_its_base_optimizer(closure_form):
    guard, said, finite = _sam_loop("sam", closure_form=closure_form)
    [warning] = said
    assert "keel.watch(model, optimizer.base_optimizer)" in warning and "SAM" in warning
    assert "word_language_model" not in warning
    assert guard.global_step == 0 and not finite  # keel judged nothing, as the warning says
