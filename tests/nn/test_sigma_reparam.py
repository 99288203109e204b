"""σReparam: power iteration converges to the top singular value, identity at conversion, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from keel.nn import SigmaReparam, SigmaReparamLinear


def test_sigma_converges_to_the_top_singular_value_from_a_random_start() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=gen)
    reparam = SigmaReparam(weight)
    reparam.u.copy_(F.normalize(torch.randn(16, generator=gen), dim=0))  # forget the SVD start
    top = np.linalg.svd(weight.double().numpy(), compute_uv=False)[0]
    reparam.train()
    for _ in range(200):
        reparam(weight)
    assert reparam.sigma.item() == pytest.approx(top, rel=1e-5)
    assert reparam.gamma.item() == pytest.approx(top, rel=1e-5)  # γ initialised to σ(W): identity at init


def test_eval_does_not_advance_u_and_stats_only_passes_the_weight() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 5, generator=gen)
    reparam = SigmaReparam(weight).eval()
    reparam.u.copy_(F.normalize(torch.ones(5), dim=0))
    u = reparam.u.clone()
    reparam(weight)
    assert torch.equal(reparam.u, u)
    monitor = SigmaReparam(weight, stats_only=True).train()
    assert monitor.gamma is None and list(monitor.parameters()) == []
    assert torch.equal(monitor(weight), weight)
    monitor(weight * 3)
    assert monitor.sigma.item() == pytest.approx(3 * np.linalg.svd(weight.numpy(), compute_uv=False)[0], rel=1e-4)


def test_from_linear_is_identity_at_conversion_and_shares_parameters() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    x = torch.randn(5, 12)
    expected = layer(x)
    sn = SigmaReparamLinear.from_linear(layer)
    assert sn.weight is layer.weight and sn.bias is layer.bias
    torch.testing.assert_close(sn(x), expected, rtol=1e-5, atol=1e-6)
    sn.eval()
    torch.testing.assert_close(sn(x), expected, rtol=1e-5, atol=1e-6)
    assert sn.spectral_norm.item() == pytest.approx(
        np.linalg.svd(layer.weight.detach().double().numpy(), compute_uv=False)[0], rel=1e-5
    )


def test_gradient_reaches_weight_through_sigma_and_gamma() -> None:
    gen = torch.Generator().manual_seed(2)
    w64 = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    layer = SigmaReparamLinear(4, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w64.float())
    layer.reparam = SigmaReparam(layer.weight)
    x = torch.randn(3, 4, generator=gen)
    layer(x).square().sum().backward()
    # float64 re-derivation: Ŵ = γ·W/σ_max(W), with σ_max's gradient u1·v1ᵀ.
    w = w64.clone().requires_grad_()
    gamma = torch.linalg.matrix_norm(w64, ord=2).clone().requires_grad_()
    ((x.double() @ (gamma * w / torch.linalg.matrix_norm(w, ord=2)).t()).square().sum()).backward()
    np.testing.assert_allclose(layer.weight.grad.numpy(), w.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert layer.reparam.gamma.grad.item() == pytest.approx(gamma.grad.item(), rel=1e-4)


def test_as_parametrization_on_conv_and_bf16_and_zero_weights() -> None:
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    expected = conv(x)
    original = conv.weight
    parametrize.register_parametrization(conv, "weight", SigmaReparam(conv.weight))
    assert conv.parametrizations.weight.original is original  # optimizer state stays valid
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-5)
    half = nn.Linear(8, 8).bfloat16()
    sn = SigmaReparamLinear.from_linear(half)
    assert sn.reparam.gamma.dtype == torch.bfloat16 and sn.reparam.sigma.dtype == torch.float32
    torch.testing.assert_close(sn(torch.ones(1, 8).bfloat16()), half(torch.ones(1, 8).bfloat16()), rtol=2e-2, atol=2e-2)
    zero = nn.Linear(3, 2)
    with torch.no_grad():
        zero.weight.zero_()
    out = SigmaReparamLinear.from_linear(zero)(torch.randn(4, 3))
    assert torch.isfinite(out).all() and torch.allclose(out, zero.bias.expand(4, 2))
    with pytest.raises(ValueError, match="dimensions"):
        SigmaReparam(torch.zeros(3))


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    a = SigmaReparamLinear(6, 3)
    a(torch.randn(2, 6))
    b = SigmaReparamLinear(6, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"weight", "bias", "reparam.u", "reparam.sigma", "reparam.gamma"}
