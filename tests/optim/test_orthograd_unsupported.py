"""⊥Grad around what it cannot serve, and keel's optimizers given tensors they cannot update, get one ValueError naming
it and what is allowed, not torch's error from inside a kernel (reviewer V12, V13)."""

from __future__ import annotations

import pytest
import torch

from keel.optim import SPAM, OrthoGrad, StableSPAM, create_optimizer


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


OPTIMIZERS = {
    "OrthoGrad": lambda params: OrthoGrad(torch.optim.AdamW(params, lr=1e-2)),
    "SPAM": lambda params: SPAM(params, lr=1e-2),
    "StableSPAM": lambda params: StableSPAM(params, lr=1e-2),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_sparse_gradient_gets_the_allowed_line(name: str) -> None:
    embedding = torch.nn.Embedding(10, 4, sparse=True)  # what hands a sparse gradient to an optimizer
    optimizer = OPTIMIZERS[name](embedding.parameters())
    embedding(torch.tensor([1, 3])).sum().backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"{name}: a sparse gradient .*\(10, 4\).*allowed: dense gradients"):
        optimizer.step()
    assert torch.equal(embedding.weight, before)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_complex_parameter_gets_the_allowed_line(name: str) -> None:
    weight = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    optimizer = OPTIMIZERS[name]([weight])
    weight.grad = torch.randn(3, 2, dtype=torch.complex64)
    before = weight.detach().clone()
    with pytest.raises(ValueError, match=rf"{name}: a torch.complex64 parameter .*allowed: real floating-point"):
        optimizer.step()
    assert torch.equal(weight, before)
