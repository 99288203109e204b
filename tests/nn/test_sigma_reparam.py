"""σReparam: power iteration converges to the top singular value, identity at conversion, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from keel._core import KeelWarning
from keel.nn import SigmaReparam, SigmaReparamLinear, stabilize


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


def _top_singular_value(weight: torch.Tensor) -> float:
    return float(np.linalg.svd(weight.detach().double().reshape(weight.shape[0], -1).numpy(), compute_uv=False)[0])


def test_stabilize_trains_a_zero_initialised_layer() -> None:
    # modded-nanogpt's c_proj / DiT's adaLN: a zero-initialised projection. γ = σ(0) = 0 and u collapsing to 0
    # left that layer at W = 0, γ = 0 for good (no gradient reaches either); the bare model trains it.
    from keel.nn import stabilize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 1))
    nn.init.zeros_(model[2].weight)
    x = torch.randn(64, 16)
    before = model(x).detach()
    stabilize(model, ["sigma_reparam"])
    assert torch.equal(model(x).detach(), before)  # still zero at conversion: the output is unchanged
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    teacher = torch.randn(16, 1)
    for _ in range(20):
        batch = torch.randn(64, 16)
        loss = F.mse_loss(model(batch), torch.tanh(batch @ teacher))
        opt.zero_grad()
        loss.backward()
        opt.step()
    reparam = model[2].parametrizations.weight[0]
    original = model[2].parametrizations.weight.original
    assert reparam.gamma.item() != 0.0 and model[2].weight.abs().max().item() > 1e-4
    assert reparam.u.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert reparam.sigma.item() == pytest.approx(_top_singular_value(original), rel=0.05)


def test_zero_weight_keeps_u_and_recovers_when_the_weight_moves() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(12, 9, generator=gen)
    reparam = SigmaReparam(weight).train()
    u = reparam.u.clone()
    reparam(torch.zeros(12, 9))
    assert reparam.sigma.item() == 0.0 and torch.equal(reparam.u, u)  # F.normalize(0) = 0 was a fixed point
    for _ in range(100):
        reparam(weight * 2)
    assert reparam.sigma.item() == pytest.approx(2 * _top_singular_value(weight), rel=1e-5)


def test_tiny_weight_sigma_matches_float64() -> None:
    # σ ≈ 4e-15: F.normalize's 1e-12 floor left v and u' far from unit length and σ orders of magnitude low.
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(16, 32, generator=gen) * 1e-15
    reparam = SigmaReparam(weight).train()
    reparam.u.copy_(F.normalize(torch.randn(32, generator=gen), dim=0))
    for _ in range(200):
        reparam(weight)
    assert reparam.sigma.item() == pytest.approx(_top_singular_value(weight), rel=1e-4, abs=0.0)


def test_zero_linear_gets_a_direction_and_a_gamma_gradient() -> None:
    zero = nn.Linear(6, 4)
    with torch.no_grad():
        zero.weight.zero_()
    x = torch.randn(5, 6)
    layer = SigmaReparamLinear.from_linear(zero)
    out = layer(x)
    torch.testing.assert_close(out, zero.bias.expand(5, 4))  # γ = 0: the output is unchanged
    assert layer.weight.abs().min().item() > 0.0 and layer.weight.abs().max().item() <= 6**-0.5
    assert layer.spectral_norm.item() == pytest.approx(_top_singular_value(layer.weight), rel=1e-5)
    out.square().sum().backward()
    assert layer.reparam.gamma.grad is not None and layer.reparam.gamma.grad.item() != 0.0
    # The direction comes from the generator given (or torch's global one), reproducibly.
    first = SigmaReparam(torch.zeros(4, 6), generator=torch.Generator().manual_seed(3)).right_inverse(torch.zeros(4, 6))
    again = SigmaReparam(torch.zeros(4, 6), generator=torch.Generator().manual_seed(3)).right_inverse(torch.zeros(4, 6))
    assert torch.equal(first, again) and first.any()
    monitor = SigmaReparam(torch.zeros(4, 6), stats_only=True)  # a monitor changes nothing
    assert not monitor.right_inverse(torch.zeros(4, 6)).any()


def test_meta_weights_still_convert() -> None:
    # A model built on the meta device (accelerate's init_empty_weights) has no values to test for zero.
    meta = torch.empty(4, 3, device="meta")
    reparam = SigmaReparam(meta)
    assert reparam.gamma is not None and reparam.gamma.device.type == "meta"
    assert reparam.right_inverse(meta) is meta


@pytest.mark.parametrize(("in_features", "out_features"), [(0, 4), (4, 0), (0, 0)])
def test_a_zero_size_layer_is_refused_at_construction_naming_its_sizes(in_features: int, out_features: int) -> None:
    # an empty matrix has no spectral norm: its SVD raised IndexError from inside (reviewer V13)
    sizes = rf"SigmaReparamLinear\(in_features={in_features}, out_features={out_features}\)"
    with pytest.raises(ValueError, match=rf"{sizes}; allowed: two ints >= 1"):
        SigmaReparamLinear(in_features, out_features)
    with pytest.raises(ValueError, match=r"a dimension of size 0; allowed: .*no dimension of size 0"):
        SigmaReparamLinear.from_linear(nn.Linear(in_features, out_features))


def test_stabilize_leaves_a_zero_size_linear_alone_and_says_so() -> None:
    model = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3), nn.Linear(3, 2))
    with pytest.warns(KeelWarning, match=r"sigma_reparam: left out 2 weights of size 0 \(0, 1\)"):
        result = stabilize(model, ["sigma_reparam"])
    assert result.by_stabilizer() == {"sigma_reparam": ["2"]}
    assert not parametrize.is_parametrized(model[0]) and parametrize.is_parametrized(model[2])
    assert model(torch.randn(5, 4)).shape == (5, 2)
