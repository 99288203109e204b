"""⊥Grad around what it cannot serve gets one ValueError naming it and what is allowed, not torch's error from
inside a step (reviewer V12, V13)."""

from __future__ import annotations

import pytest
import torch

from keel.optim import OrthoGrad, create_optimizer


class _SharpnessAware(torch.optim.SGD):
    """A SAM-style optimizer: its step needs the closure (it evaluates the loss at a perturbed point)."""

    def step(self, closure):  # type: ignore[override]
        closure()
        return super().step()


@pytest.mark.parametrize("base", [torch.optim.LBFGS, _SharpnessAware])
def test_a_base_whose_step_needs_a_closure_is_refused_at_construction(base: type) -> None:
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match=f"OrthoGrad: {base.__name__}.step needs a closure.*allowed: "):
        OrthoGrad(base(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=f"{base.__name__}.step needs a closure"):
        create_optimizer("orthograd", model.parameters(), base=base, lr=0.1)


def test_a_base_whose_closure_is_optional_is_accepted_and_steps_with_one() -> None:
    model = torch.nn.Linear(3, 1)
    opt = OrthoGrad(torch.optim.SGD(model.parameters(), lr=0.1))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).square().mean()
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
