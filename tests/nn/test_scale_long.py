"""ScaleLong: the κ^(N−1−i) factors, the calibration module, and the stabilizer on a tiny U-ViT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keel.nn import LongSkipCalibration, LongSkipScaling, create_stabilizer, scale_long_factors, stabilize


class Block(nn.Module):
    """A U-ViT block: an output block fuses its long skip with Linear(2D → D) over [x, skip]."""

    def __init__(self, dim: int, skip: bool) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        return x + self.mlp(x)


class TinyUViT(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3, kappa: float | None = None) -> None:
        super().__init__()
        self.in_blocks = nn.ModuleList(Block(dim, skip=False) for _ in range(depth))
        self.mid_block = Block(dim, skip=False)
        self.out_blocks = nn.ModuleList(Block(dim, skip=True) for _ in range(depth))
        self.kappa = kappa  # the official code's scalelong=2 written out, as an independent reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for i, block in enumerate(self.out_blocks):
            skip = skips.pop()
            if self.kappa is not None:
                skip = skip * self.kappa ** (len(self.out_blocks) - 1 - i)
            x = block(x, skip)
        return x


def test_factors_and_constant_scaling() -> None:
    assert scale_long_factors(4, 0.5) == [0.125, 0.25, 0.5, 1.0]
    cs = LongSkipScaling(3, kappa=0.8)
    torch.testing.assert_close(cs(torch.ones(2), 0), torch.full((2,), 0.64))
    with pytest.raises(IndexError):
        cs(torch.ones(2), 3)
    with pytest.raises(ValueError, match="kappa"):
        scale_long_factors(3, 1.5)


@pytest.mark.parametrize(("layout", "shape"), [("tokens", (2, 10, 4)), ("channels", (2, 10, 5, 5))])
def test_calibration_gates_in_unit_interval(layout: str, shape: tuple[int, ...]) -> None:
    calib = LongSkipCalibration(10, reduction=4, layout=layout)
    skip = torch.randn(shape)
    gate = calib.gate(skip)
    assert gate.shape == (2, 10, *([1] * (len(shape) - 2)))
    assert ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(calib(skip), skip * gate)
    with pytest.raises(ValueError, match="layout"):
        LongSkipCalibration(10, layout="spatial")


def test_stabilizer_is_identity_at_kappa_one_and_matches_the_official_scaling_otherwise() -> None:
    torch.manual_seed(0)
    model = TinyUViT()
    x = torch.randn(2, 6, 8)
    expected = model(x)
    result = stabilize(model, [create_stabilizer("scale_long", kappa=1.0)])
    assert result.by_stabilizer() == {"scale_long": ["out_blocks"]}  # in_blocks take no skip: not matched
    torch.testing.assert_close(model(x), expected)

    torch.manual_seed(0)
    hooked, written_out = TinyUViT(), TinyUViT(kappa=0.5)
    written_out.load_state_dict(hooked.state_dict())
    stabilize(hooked, [create_stabilizer("scale_long", kappa=0.5)])
    torch.testing.assert_close(hooked(x), written_out(x))
    assert not torch.allclose(hooked(x), expected)


def test_calibrated_mode_adds_trainable_parameters_to_the_optimizer() -> None:
    torch.manual_seed(0)
    model = TinyUViT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = sum(len(g["params"]) for g in opt.param_groups)
    result = stabilize(
        model, [create_stabilizer("scale_long", mode="calibrated", tokens=6, reduction=2)], optimizer=opt
    )
    assert isinstance(model.long_skip_calibration, LongSkipCalibration)
    assert sum(len(g["params"]) for g in opt.param_groups) == before + len(result.new_parameters) == before + 4
    x = torch.randn(2, 6, 8)
    model(x).square().mean().backward()
    assert model.long_skip_calibration.fc1.weight.grad is not None
    opt.step()
    with pytest.raises(ValueError, match="tokens"):
        create_stabilizer("scale_long", mode="calibrated")


def test_blocks_option_names_the_decoder_list() -> None:
    torch.manual_seed(0)
    model = TinyUViT()
    result = stabilize(model, [create_stabilizer("scale_long", blocks="out_blocks", kappa=0.9)])
    assert result.by_stabilizer() == {"scale_long": ["out_blocks"]}
