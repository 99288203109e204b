"""PowerNorm forward, running statistics and approximate backward against a float64 re-derivation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from keel.nn import PowerNorm
from tests.integrations.test_compile import GraphCounter


class PowerNormReference:
    """PowerNorm (arXiv 2003.07845; official MaskPowerNorm) in float64, tokens × channels, group scaling 1."""

    def __init__(self, channels, *, eps, afwd, abkw, warmup, reference_backward):
        self.phi = np.ones(channels)
        self.gz = np.zeros(channels)
        self.iters = 0
        self.eps, self.afwd, self.abkw, self.warmup = eps, afwd, abkw, warmup
        self.reference_backward = reference_backward

    @staticmethod
    def group_scale(x):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)

    def forward(self, x, valid, weight, bias):
        x = self.group_scale(x.astype(np.float64))
        self.iters += 1
        i = self.iters
        psi = (x[valid] ** 2).mean(0)
        warm = i <= self.warmup
        used = psi if warm else self.phi.copy()
        self.divisor = psi if (warm or self.reference_backward) else used
        if i < self.warmup:
            self.phi = self.phi * (i - 1) / i + psi / i
        self.phi = self.afwd * self.phi + (1 - self.afwd) * psi
        self.z = x / np.sqrt(used + self.eps)
        self.valid = valid
        return self.z * weight + bias

    def backward(self, grad_out, weight):
        g = grad_out * weight
        approx = g - (1 - self.abkw) * self.gz * self.z
        self.gz = self.gz + (approx * self.z)[self.valid].mean(0)
        return approx / np.sqrt(self.divisor + self.eps)


@pytest.mark.parametrize("reference_backward", [False, True])
def test_forward_backward_and_statistics_match_float64(reference_backward: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    C = 6
    pn = PowerNorm(C, warmup_iters=3, reference_backward=reference_backward)
    with torch.no_grad():
        pn.weight.copy_(torch.linspace(0.5, 1.5, C))
        pn.bias.copy_(torch.linspace(-0.2, 0.2, C))
    ref = PowerNormReference(C, eps=1e-5, afwd=0.9, abkw=0.9, warmup=3, reference_backward=reference_backward)
    for step in range(6):  # warm-up (steps 1–3), then running statistics
        x = (torch.randn(4, 5, C, generator=gen) * (1 + step)).requires_grad_()
        pad = torch.zeros(4, 5, dtype=torch.bool)
        pad[0, 3:] = True
        y = pn(x, pad_mask=pad)
        expected = ref.forward(x.detach().numpy(), ~pad.numpy(), pn.weight.detach().numpy(), pn.bias.detach().numpy())
        np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=f"forward {step}")
        grad_out = torch.randn(4, 5, C, generator=gen)
        y.backward(grad_out)
        # The approximate rule gives the gradient at PowerNorm's input; the exact group scaling (float64
        # autograd) carries it back to x.
        grad_at_norm_input = ref.backward(grad_out.double().numpy(), pn.weight.detach().double().numpy())
        x64 = x.detach().double().requires_grad_()
        (x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5)).backward(torch.tensor(grad_at_norm_input))
        np.testing.assert_allclose(x.grad.numpy(), x64.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=f"grad {step}")
        np.testing.assert_allclose(pn.running_phi.numpy(), ref.phi, rtol=1e-5)
        np.testing.assert_allclose(pn.ema_gz.numpy(), ref.gz, rtol=1e-4, atol=1e-7)
    assert int(pn.iters) == 6


def test_eval_uses_running_statistic_and_padding_is_ignored() -> None:
    pn = PowerNorm(3, warmup_iters=1, groups=None)
    x = torch.randn(2, 4, 3)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1, 2:] = True
    noisy = x.clone()
    noisy[1, 2:] = 1e6  # padded tokens must not move the statistics
    pn(noisy, pad_mask=pad)
    phi = pn.running_phi.clone()
    fresh = PowerNorm(3, warmup_iters=1, groups=None)
    fresh(x, pad_mask=pad)
    torch.testing.assert_close(phi, fresh.running_phi)
    pn.eval()
    torch.testing.assert_close(pn(x), x / torch.sqrt(phi + 1e-5))


def test_state_dict_round_trip_keeps_the_iteration_count() -> None:
    a = PowerNorm(4, warmup_iters=2)
    for _ in range(3):
        a(torch.randn(5, 4))
    b = PowerNorm(4, warmup_iters=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    torch.testing.assert_close(a(x), b(x))  # both past warm-up: the running statistic is used
    assert int(b.iters) == 4


def test_edge_cases_and_validation() -> None:
    pn = PowerNorm(4, groups=2)
    assert torch.isfinite(pn(torch.zeros(3, 4))).all()
    assert torch.isnan(pn(torch.tensor([[float("nan"), 1.0, 1.0, 1.0]]))).any()
    with pytest.raises(ValueError, match="PowerNorm.groups="):
        PowerNorm(6, groups=4)
    with pytest.raises(ValueError, match="PowerNorm.alpha_fwd="):
        PowerNorm(4, alpha_fwd=1.5)
    with pytest.raises(ValueError, match="num_features=4"):
        pn(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="pad_mask.shape"):
        pn(torch.zeros(2, 4), pad_mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pad_mask.dtype=torch.int64; allowed: torch.bool"):
        pn(torch.zeros(2, 4), pad_mask=torch.zeros(2, dtype=torch.long))  # before: ~0 = -1 weighted the token


# Relative to the largest reference value: one rounding of the output to the dtype (float32: its own arithmetic).
OUTPUT_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    expected_t = torch.from_numpy(expected)
    return ((actual.detach().double() - expected_t).abs().max() / expected_t.abs().max()).item()


@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: x² past float16's 65504 (reviewer V15)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_inputs_are_normalised_in_float32_and_match_float64(dtype: torch.dtype, scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    C = 16
    pn = PowerNorm(C, warmup_iters=2).to(dtype)
    with torch.no_grad():
        pn.weight.copy_(torch.linspace(0.5, 1.5, C))
        pn.bias.copy_(torch.linspace(-0.25, 0.25, C))
    assert pn.running_phi.dtype == pn.ema_gz.dtype == torch.float32  # statistics stay float32 under .to(half)
    weight, bias = pn.weight.detach().double().numpy(), pn.bias.detach().double().numpy()
    ref = PowerNormReference(C, eps=1e-5, afwd=0.9, abkw=0.9, warmup=2, reference_backward=False)
    pad = torch.zeros(4, 8, dtype=torch.bool)
    pad[0, 5:] = True
    for step in range(4):  # warm-up (steps 1–2), then the running statistic
        x = (torch.randn(4, 8, C, generator=gen) * scale).to(dtype).requires_grad_()
        y = pn(x, pad_mask=pad)
        expected = ref.forward(x.detach().double().numpy(), ~pad.numpy(), weight, bias)
        assert y.dtype == dtype
        assert _relative_error(y, expected) <= OUTPUT_TOLERANCE[dtype], f"forward {step}"
        grad_out = torch.randn(4, 8, C, generator=gen).to(dtype)
        y.backward(grad_out)
        grad_at_norm_input = ref.backward(grad_out.double().numpy(), weight)
        x64 = x.detach().double().requires_grad_()
        (x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5)).backward(torch.tensor(grad_at_norm_input))
        assert x.grad.dtype == dtype and pn.weight.grad.dtype == dtype
        assert _relative_error(x.grad, x64.grad.numpy()) <= 4 * OUTPUT_TOLERANCE[dtype], f"grad {step}"
        np.testing.assert_allclose(pn.running_phi.numpy(), ref.phi, rtol=1e-5)
        np.testing.assert_allclose(pn.ema_gz.numpy(), ref.gz, rtol=1e-4, atol=1e-6)
    pn.eval()
    x = (torch.randn(4, 8, C, generator=gen) * scale).to(dtype)
    expected = ref.group_scale(x.double().numpy()) / np.sqrt(ref.phi + 1e-5) * weight + bias
    assert _relative_error(pn(x), expected) <= OUTPUT_TOLERANCE[dtype]


@pytest.mark.parametrize("groups", [1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_infinite_and_nan_inputs_give_what_float64_gives_and_padding_stays_out(dtype, groups) -> None:
    C = 4
    x = torch.randn(3, 5, C, generator=torch.Generator().manual_seed(1))
    x[0, 0] = 0.0  # a zero token
    x[0, 1, 2] = float("inf")
    x[1, 3, 0] = -float("inf")
    x[2, 4] = float("nan")  # padded: neither it nor the infinities below may reach the statistics
    x[2, 3] = float("inf")
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2, 3:] = True
    x = x.to(dtype)
    pn = PowerNorm(C, warmup_iters=5, groups=groups).to(dtype)
    y = pn(x, pad_mask=pad)

    x64 = x.double()
    scaled = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5) if groups else x64
    psi = scaled[~pad].square().mean(0)
    expected = scaled / torch.sqrt(psi + 1e-5)
    assert y.dtype == dtype
    kept = ~pad
    tolerance = 8 * OUTPUT_TOLERANCE[dtype]
    torch.testing.assert_close(y[kept].double(), expected[kept], rtol=tolerance, atol=0.0, equal_nan=True)
    assert torch.equal(torch.isnan(pn.running_phi), torch.isnan(psi))  # the infinite channels only, as in float64
    zeros = torch.zeros(2, 3, C, dtype=dtype)
    assert torch.equal(PowerNorm(C).to(dtype)(zeros), zeros)


@pytest.mark.parametrize("reference_backward", [False, True])
def test_a_compiled_power_norm_does_not_recompile_through_and_past_warm_up(reference_backward):
    """Before, the step count was a host int: a recompilation at every training forward (10 graphs in 12 forwards,
    then eager for good past the recompile limit). The approximate backward runs eagerly (one graph break): traced,
    inductor got it wrong after warm-up (/tmp/h27X/c12_powernorm_inductor.py)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = torch.nn.Sequential(
        torch.nn.Linear(8, 8),
        PowerNorm(8, warmup_iters=3, reference_backward=reference_backward),
        torch.nn.Linear(8, 1),
    )
    compiled_model = copy.deepcopy(eager)
    backend = GraphCounter()
    forward = torch.compile(compiled_model, backend=backend)
    compiled = []
    for _ in range(6):  # forwards 1-3 in warm-up (batch ψ²), 4-6 past it (running φ)
        x = torch.randn(4, 8)
        eager(x).square().mean().backward()
        before = backend.compiled
        forward(x).square().mean().backward()
        compiled.append(backend.compiled - before)
    assert compiled[1:] == [0] * 5, compiled
    assert int(compiled_model[1].iters) == 6
    for name, value in eager.state_dict().items():
        assert torch.equal(value, compiled_model.state_dict()[name]), name
    for a, b in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
