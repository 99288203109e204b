"""Confidence-guided annealing (OFQ's CGA): which weights keep training (a hand-derived example), the frozen ones
bit-identical through AdamW's decay and momentum, oscillation annealing away, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel.nn import fake_quantize
from keel.optim import ConfidenceGuidedAnnealing
from keel.optim.cga import unconfident
from keel.signals.weight_oscillation import new_state, track_oscillation_


def statsq_layer(weight: list[list[float]]) -> nn.Module:
    model = fake_quantize(nn.Sequential(nn.Linear(len(weight[0]), len(weight))), "statsq", bits=2, exclude=())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(weight))
        model[0].bias.zero_()
    return model


def test_only_weights_within_the_band_of_a_boundary_keep_their_gradient_hand_derived() -> None:
    # 2 bits: s = 2·mean|W| = 0.4, b = W/s·2 − 0.5 = [0, −2, 0.75, −1.25]: frac(b) = [0, 0, 0.75, 0.75], distance to
    # the boundary |frac − 0.5| = [0.5, 0.5, 0.25, 0.25]; with BR 0.3 the last two are unconfident and train
    model = statsq_layer([[0.1, -0.3, 0.25, -0.15]])
    weight = model[0].weight
    before = weight.detach().clone()
    opt = torch.optim.SGD([weight], lr=0.1)
    ConfidenceGuidedAnnealing([model[0]], boundary_range=0.3).attach(opt)
    weight.grad = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    opt.step()
    assert torch.equal(weight.detach()[0, :2], before[0, :2])
    assert torch.allclose(weight.detach()[0, 2:], before[0, 2:] - 0.1)


def test_frozen_weights_stay_bit_identical_under_adamw_decay_and_momentum() -> None:
    torch.manual_seed(0)
    model = fake_quantize(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), "statsq", bits=2, exclude=())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):  # build momentum first
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    cga = ConfidenceGuidedAnnealing.for_model(model)
    cga.attach(opt)
    weights = [model[0].weight, model[2].weight]
    confident = [~unconfident(m.weight_quantizer.positions(m.weight), 0.005) for m in (model[0], model[2])]
    before = [w.detach().clone() for w in weights]
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    for w, b, c in zip(weights, before, confident, strict=True):
        assert torch.equal(w.detach()[c], b[c])
    assert 0.9 < cga.frozen_share() < 1.0  # BR 0.005 keeps ~1 % training


def test_cga_anneals_the_oscillation_of_codes_away() -> None:
    # a layer pushed across its boundaries by a gradient whose sign flips every step (the worst case for STE)
    torch.manual_seed(0)
    model = fake_quantize(nn.Sequential(nn.Linear(32, 32)), "statsq", bits=2, exclude=())
    layer = model[0]
    opt = torch.optim.SGD([layer.weight], lr=0.02)

    def share(steps: int) -> float:
        state = new_state(layer.quantized_codes())
        for t in range(steps):
            layer.weight.grad = torch.full_like(layer.weight, 1.0 if t % 2 else -1.0)
            opt.step()
            track_oscillation_(state, layer.quantized_codes())
        return float((state.ema > 0.02).float().mean())

    assert share(40) > 0.05
    ConfidenceGuidedAnnealing([layer]).attach(opt)
    assert share(40) == 0.0


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.floats(-50, 50, allow_nan=False), st.floats(0.001, 0.5))
def test_unconfident_is_the_band_around_half_integers(b: float, br: float) -> None:
    frac = b - float(torch.floor(torch.tensor(b, dtype=torch.float64)))
    expected = abs(frac - 0.5) <= br
    if abs(abs(frac - 0.5) - br) > 1e-6:  # away from the band's own edge, where float32 may round either way
        assert bool(unconfident(torch.tensor([b], dtype=torch.float64), br)) is expected


@pytest.mark.parametrize("br", [0.0, -0.1, 0.6, float("nan"), True, "0.005"])
def test_bad_boundary_range_names_the_value(br: object) -> None:
    layer = statsq_layer([[0.1, 0.2]])[0]
    with pytest.raises(ValueError, match="boundary_range"):
        ConfidenceGuidedAnnealing([layer], boundary_range=br)  # type: ignore[arg-type]


def test_layers_without_a_statsq_grid_are_refused_with_one_clear_error() -> None:
    with pytest.raises(ValueError, match="no StatsQ layer"):
        ConfidenceGuidedAnnealing.for_model(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"layers\[0\] is a Linear"):
        ConfidenceGuidedAnnealing([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="no layer"):
        ConfidenceGuidedAnnealing([])
