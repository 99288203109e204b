"""keel's stabilizer modules and losses under ``torch.compile(fullgraph=True)``: one graph over several training
steps (buffers that advance every step — σReparam's u and σ — are graph state, not
guards), and the same outputs, input gradients, parameter gradients and buffers as in eager mode. PowerNorm, whose
approximate backward runs eagerly (one graph break), is in tests/nn/test_power_norm.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import keel.losses as kl
import keel.nn as kn
from tests.integrations.test_compile import GraphCounter
from tests.nn._models import SelfAttention


class _Call(nn.Module):
    """A loss function as a module, so that every case is compiled the same way."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _stabilized_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    kn.stabilize(model, ["sigma_reparam"])
    return model


CASES = [
    pytest.param(lambda: kn.QKNorm(16, kind="rms"), (2, 3, 5, 16), id="qk_norm"),
    pytest.param(lambda: kn.SigmaReparamLinear(16, 8), (4, 16), id="sigma_reparam_linear"),
    pytest.param(_stabilized_mlp, (4, 16), id="stabilize_sigma_reparam"),
    pytest.param(lambda: kn.StableMax(log=True), (4, 10), id="stablemax_log"),
    pytest.param(SelfAttention, (2, 5, 16), id="qk_norm_attention"),
    pytest.param(
        lambda: kn.fake_quantize(nn.Sequential(nn.Linear(16, 8)), "statsq", exclude=()),
        (4, 16),
        id="statsq",
    ),
    pytest.param(lambda: _Call(kl.z_loss), (4, 10), id="z_loss"),
    pytest.param(lambda: _Call(lambda x: kl.stablemax_cross_entropy(x, torch.arange(4))), (4, 10), id="stablemax_ce"),
    pytest.param(lambda: _Call(kl.router_z_loss), (12, 4), id="router_z_loss"),
]


@pytest.mark.parametrize(("build", "shape"), CASES)
def test_one_graph_over_training_steps_and_eager_results(build, shape) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build()
    compiled_module = copy.deepcopy(eager)
    backend = GraphCounter()
    compiled = torch.compile(compiled_module, backend=backend, fullgraph=True)
    for _ in range(3):
        x = torch.randn(shape) * 3
        outputs = []
        for module in (eager, compiled):
            xi = x.clone().requires_grad_()
            y = module(xi)
            # a loss a normalisation does not make constant (mean(y²) is ≈ 1 after QK-norm: gradients ≈ 0)
            (y * torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)).sum().backward()
            outputs.append((y.detach(), xi.grad))
        (y_eager, g_eager), (y_compiled, g_compiled) = outputs
        assert torch.equal(y_eager, y_compiled) and torch.equal(g_eager, g_compiled)
    assert backend.compiled == 1
    for (name, a), b in zip(eager.named_parameters(), compiled_module.parameters(), strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(eager.named_buffers(), compiled_module.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_stabilize_after_the_model_was_compiled_and_run_recompiles_once() -> None:
    """The graph compiled before `stabilize` fails its guards; the stabilized model is compiled once and matches
    eager mode (σReparam applied at the same step)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    model = copy.deepcopy(eager)
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend)
    compiled_per_step = []
    for step in range(4):
        if step == 2:
            kn.stabilize(eager, ["sigma_reparam"])
            kn.stabilize(model, ["sigma_reparam"])
        x = torch.randn(4, 16)
        before = backend.compiled
        y = compiled(x)
        compiled_per_step.append(backend.compiled - before)
        assert torch.equal(y, eager(x))
    assert compiled_per_step == [1, 0, 1, 0]
