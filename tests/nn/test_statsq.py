"""StatsQ (OFQ): a hand-computed worked example, a float64 reference, the levels per bit width, the STE, the
registered grid on keel's fake-quant surgery, and hostile inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel.nn import fake_quantize, list_quantizers
from keel.nn.statsq import StatsQuantizer, statsq_levels, statsq_position, statsq_quantize, statsq_scale


def reference_statsq(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OFQ's formula written out in float64, row by row (not keel's code): (codes, values)."""
    n = 2 ** (bits - 1)
    codes, values = [], []
    for row in w.double().reshape(w.shape[0], -1):
        s = 2 * row.abs().mean()
        c = torch.round(torch.clamp(row / s, -1, 1 - 1e-6) * n - 0.5)
        codes.append(c)
        values.append(s * (c + 0.5) / n)
    return torch.stack(codes).reshape(w.shape), torch.stack(values).reshape(w.shape)


def test_statsq_matches_a_hand_computed_two_bit_row() -> None:
    # row 0: mean|W| = 0.2 → s = 0.4; W/s = [0.25, -0.75, 0.625, -0.375]; b = W/s·2 − 0.5 = [0, -2, 0.75, -1.25]
    # codes [0, -2, 1, -1]; Q = 0.4·(code + 0.5)/2 = [0.1, -0.3, 0.3, -0.1]
    # row 1: mean|W| = 1 → s = 2; W/s = [1.5, 0, 0, 0.5] → clipped to 1 − 1e-6 (b = 1.499998: the top code 1); the
    # zeros sit on a boundary (b = −0.5) and 0.5 too (b = 0.5): torch.round halves to even, code 0 for all three
    # row 2: s = 2; W/s = −2 → clipped to −1, b = −2.5 → −2 (half to even, the bottom code)
    w = torch.tensor([[0.1, -0.3, 0.25, -0.15], [3.0, 0.0, 0.0, 1.0], [-4.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    codes, values = statsq_levels(w, 2)
    assert codes.tolist() == [[0, -2, 1, -1], [1, 0, 0, 0], [-2, 0, 0, 0]]
    expected = torch.tensor([[0.1, -0.3, 0.3, -0.1], [1.5, 0.5, 0.5, 0.5], [-1.5, 0.5, 0.5, 0.5]], dtype=w.dtype)
    assert torch.allclose(values, expected)
    assert torch.allclose(statsq_scale(w).flatten(), torch.tensor([0.4, 2.0, 2.0], dtype=w.dtype))


@pytest.mark.parametrize(("bits", "levels"), [(2, [-0.75, -0.25, 0.25, 0.75]), (3, [k / 8 for k in range(-7, 8, 2)])])
def test_statsq_levels_are_symmetric_and_exclude_zero(bits: int, levels: list[float]) -> None:
    w = torch.linspace(-3, 3, 601, dtype=torch.float64).reshape(1, -1)
    _, values = statsq_levels(w, bits)
    assert sorted(set((values / statsq_scale(w)).flatten().round(decimals=9).tolist())) == levels


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 4),
    cols=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_statsq_matches_the_float64_reference(bits: int, rows: int, cols: int, seed: int) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    codes, values = statsq_levels(w, bits)
    ref_codes, ref_values = reference_statsq(w, bits)
    assert torch.equal(codes.double(), ref_codes)
    assert torch.allclose(values, ref_values)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


def test_statsq_float32_agrees_with_float64_except_at_boundaries() -> None:
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    codes32, _ = statsq_levels(w, 3)
    codes64, _ = statsq_levels(w.double(), 3)
    position = statsq_position(w.double(), 3)
    near = (position - position.floor() - 0.5).abs() < 1e-5  # float32 may round these either way
    assert torch.equal(codes32[~near], codes64[~near])


def test_statsq_gradient_is_the_straight_through_identity_and_the_scale_gets_none() -> None:
    w = torch.randn(3, 5, requires_grad=True)
    g = torch.randn(3, 5)
    (statsq_quantize(w, 2) * g).sum().backward()
    assert w.grad is not None and torch.equal(w.grad, g)


def test_statsq_keeps_half_dtypes_and_a_zero_row_finite() -> None:
    w = torch.zeros(2, 4, dtype=torch.bfloat16)
    w[1] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    codes, values = statsq_levels(w, 4)
    assert values.dtype == torch.bfloat16 and torch.isfinite(values).all()
    assert values[0].abs().max() < 1e-30  # s = smallest normal: ±s/16, not NaN


def test_statsq_non_finite_weight_gives_nan_values_not_a_crash() -> None:
    w = torch.tensor([[1.0, float("nan"), 0.5], [1.0, 2.0, 3.0]])
    _, values = statsq_levels(w, 2)
    assert torch.isnan(values[0]).all() and torch.isfinite(values[1]).all()


@pytest.mark.parametrize("bits", [1, 9, 0, 2.0, True, "2", None])
def test_statsq_rejects_bad_bits_naming_the_value(bits: object) -> None:
    with pytest.raises(ValueError, match=r"bits=.*allowed"):
        StatsQuantizer(bits=bits)  # type: ignore[arg-type]


def test_statsq_is_a_registered_grid_on_keels_fake_quant_surgery() -> None:
    assert "statsq" in list_quantizers()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    weight = model[0].weight
    fake_quantize(model, "statsq", bits=2, exclude=())
    assert model[0].weight is weight  # the Parameter is shared: an optimizer built before keeps training it
    codes = model[0].quantized_codes()
    assert codes.dtype == torch.int8 and codes.shape == weight.shape
    assert torch.equal(codes, statsq_levels(weight, 2)[0])
    x = torch.randn(5, 8)
    assert torch.allclose(model[0](x), x @ statsq_levels(weight, 2)[1].T + model[0].bias, atol=1e-6)
