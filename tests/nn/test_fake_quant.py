"""Fake quantization: Stable-SPAM's min-max int4 grid against a hand computation and float64, the STE, the
surgery, and how far torchao's asymmetric int4 grid agrees with it."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel.nn import FakeQuantLinear, fake_quantize, list_quantizers
from keel.nn.fake_quant import NO_CODE, MinMaxQuantizer, fake_quantized_layers
from keel.proxy.model import create_proxy_model


def reference_minmax(x: torch.Tensor, group_size: int, bits: int = 4, min_scale: float = 1e-5) -> torch.Tensor:
    """The reference's ``_quantize_tensor`` + dequantization, written out in float64 (not keel's code)."""
    top = 2**bits - 1
    g = x.double().reshape(-1, group_size)
    lo, hi = g.min(dim=1, keepdim=True).values, g.max(dim=1, keepdim=True).values
    scale = torch.clamp(hi - lo, min=min_scale) / top
    zero = torch.clamp(-torch.round(lo / scale), 0, top)
    code = torch.clamp(torch.round(g / scale) + zero, 0, top)
    return ((code - zero) * scale).reshape(x.shape)


def test_minmax_matches_a_hand_computed_group_including_a_half_rounded_to_even() -> None:
    # range 1.875 = 15 · 0.125: scale 0.125 exactly; zero = −round(−0.5/0.125) = 4;
    # 0.3125/0.125 = 2.5 rounds to 2 (half to even) → code 6 → value 0.25
    x = torch.tensor([-0.5, -0.125, 0.3125, 1.375])
    codes, values = MinMaxQuantizer(group_size=4).quantize(x)
    assert codes.tolist() == [0, 3, 6, 15]
    assert values.tolist() == [-0.5, -0.125, 0.25, 1.375]


def test_minmax_groups_run_over_the_flattened_weight_across_rows() -> None:
    # a (2, 6) weight in groups of 4: elements 0-3, 4-7 (row 0's tail and row 1's head), 8-11
    w = torch.linspace(-1, 1, 12).reshape(2, 6)
    w_outlier = w.clone()
    w_outlier[0, 5] = 100.0  # element 5: group 1 only
    _, base = MinMaxQuantizer(group_size=4).quantize(w)
    _, hit = MinMaxQuantizer(group_size=4).quantize(w_outlier)
    changed = (base != hit).flatten().nonzero().flatten().tolist()
    assert set(changed) <= {4, 5, 6, 7} and {4, 6, 7} & set(changed)
    assert torch.equal(base.flatten()[:4], hit.flatten()[:4]) and torch.equal(base.flatten()[8:], hit.flatten()[8:])


@pytest.mark.parametrize(
    ("constant", "expected"),
    [(0.5, 1e-5), (-3.0, -1e-5), (0.0, 0.0)],
    ids=["positive-becomes-min-scale", "negative-becomes-minus-min-scale", "zero-stays"],
)
def test_a_constant_group_collapses_to_the_min_scale_as_in_the_reference(constant: float, expected: float) -> None:
    x = torch.full((8,), constant)
    codes, values = MinMaxQuantizer(group_size=8).quantize(x)
    assert values.double() == pytest.approx([expected] * 8, rel=1e-6, abs=1e-12)
    assert values.double().tolist() == pytest.approx(reference_minmax(x, 8).tolist(), rel=1e-6, abs=1e-12)
    assert codes.unique().numel() == 1


def test_an_all_positive_group_is_clamped_to_its_range_from_zero_as_in_the_reference() -> None:
    x = torch.tensor([1.0, 1.25, 1.5, 2.0])  # zero point clamps to 0: the grid is [0, max − min] = [0, 1]
    _, values = MinMaxQuantizer(group_size=4).quantize(x)
    assert values.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
def test_a_non_finite_group_becomes_nan_with_no_code_and_other_groups_are_untouched(bad: float) -> None:
    x = torch.tensor([0.1, -0.2, 0.3, 0.4, 0.5, -0.6, 0.7, 0.8])
    x_bad = x.clone()
    x_bad[1] = bad
    codes, values = MinMaxQuantizer(group_size=4).quantize(x_bad)
    assert values[:4].isnan().all() and (codes[:4] == NO_CODE).all()
    _, clean = MinMaxQuantizer(group_size=4).quantize(x)
    assert torch.equal(values[4:], clean[4:])


def test_zeros_quantize_to_exact_zeros_with_code_zero() -> None:
    codes, values = MinMaxQuantizer(group_size=4).quantize(torch.zeros(2, 4))
    assert torch.equal(values, torch.zeros(2, 4)) and torch.equal(codes, torch.zeros(2, 4, dtype=torch.int16))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 4),
    groups_per_row=st.sampled_from([1, 2]),
    group_size=st.sampled_from([4, 16, 256]),
    scale=st.floats(1e-4, 1e3),
    shift=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_minmax_agrees_with_the_float64_reference(
    rows: int, groups_per_row: int, group_size: int, scale: float, shift: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, groups_per_row * group_size, generator=gen) + shift) * scale
    codes, values = MinMaxQuantizer(group_size=group_size).quantize(w)
    expected = reference_minmax(w, group_size)
    step = (w.reshape(-1, group_size).amax(1) - w.reshape(-1, group_size).amin(1)).double() / 15
    # float32 vs float64: a value may land one grid step away only where x/scale sits on a rounding tie
    off = ((values.double() - expected).abs().reshape(-1, group_size) / step[:, None]).round()
    assert off.max() <= 1 and (off > 0).float().mean() <= 0.01
    assert codes.min() >= 0 and codes.max() <= 15 and codes.dtype == torch.int16


def test_bf16_weights_quantize_in_float32_and_come_back_as_bf16_on_the_float64_grid() -> None:
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    _, values = MinMaxQuantizer(group_size=256).quantize(w)
    assert values.dtype == torch.bfloat16
    assert torch.equal(values, reference_minmax(w, 256).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_forward_s_values_without_codes_are_bit_identical_to_quantize_s_also_around_nan_and_inf(
    dtype: torch.dtype,
) -> None:
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)) * 3
    w[0, 5], w[1, 7], w[2, 0] = math.nan, math.inf, 0.0
    quantizer = MinMaxQuantizer(group_size=16)
    dequantized, (_, values) = quantizer.dequantized(w.to(dtype)), quantizer.quantize(w.to(dtype))
    assert dequantized.dtype == dtype and torch.equal(dequantized.isnan(), values.isnan())
    assert torch.equal(dequantized.nan_to_num(7.0), values.nan_to_num(7.0))


def test_the_gradient_passes_straight_through_to_the_float_weights() -> None:
    w = torch.randn(2, 8, requires_grad=True)
    quantizer = MinMaxQuantizer(group_size=8)
    out = quantizer(w)
    assert torch.equal(out.detach(), quantizer.quantize(w)[1])
    (out * torch.arange(16.0).reshape(2, 8)).sum().backward()
    assert torch.equal(w.grad, torch.arange(16.0).reshape(2, 8))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": "256"}, "group_size"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": math.inf}, "min_scale"),
        ({"min_scale": math.nan}, "min_scale"),
    ],
)
def test_bad_quantizer_options_get_one_error_naming_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"MinMaxQuantizer.{field}=.*allowed"):
        MinMaxQuantizer(**options)  # type: ignore[arg-type]


def test_a_tensor_the_group_does_not_divide_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="not a multiple of group_size=256"):
        MinMaxQuantizer().quantize(torch.zeros(3, 100))


def test_fake_quantize_converts_the_proxy_blocks_shares_parameters_and_keeps_the_head() -> None:
    torch.manual_seed(0)
    model = create_proxy_model("tiny")
    before = {name: p for name, p in model.named_parameters()}
    fake_quantize(model, "minmax", group_size=64)
    layers = fake_quantized_layers(model)
    assert sorted(layers) == sorted(
        n for n, m in create_proxy_model("tiny").named_modules() if n != "head" and type(m) is nn.Linear
    )
    assert type(model.head) is nn.Linear
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in before.items()}
    layer = layers["blocks.0.mlp.fc"]
    x = torch.randn(3, layer.in_features)
    _, wq = MinMaxQuantizer(group_size=64).quantize(layer.weight)
    assert torch.allclose(layer(x), F.linear(x, wq, layer.bias))
    codes = layer.quantized_codes()
    assert codes.shape == layer.weight.shape and codes.dtype == torch.int16


def test_fake_quantize_leaves_layers_the_group_does_not_divide_and_names_them_in_one_warning() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))
    with pytest.warns(UserWarning, match=r"left in full precision: 1 \(48 elements"):
        fake_quantize(model, group_size=32, exclude=())
    assert isinstance(model[0], FakeQuantLinear) and type(model[1]) is nn.Linear


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: fake_quantize(m, "int3"), "unknown quantizer 'int3'; allowed: minmax"),
        (lambda m: fake_quantize(m, group_size=-1), "group_size=-1"),
        (lambda m: fake_quantize(m, exclude=("*",)), "no nn.Linear left to quantize"),
        (lambda m: fake_quantize(m[0]), "is an nn.Linear itself"),
    ],
    ids=["unknown-grid", "bad-option", "nothing-left", "bare-linear"],
)
def test_bad_fake_quantize_calls_get_one_clear_error(call: object, match: str) -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match=match):
        call(model)  # type: ignore[operator]
    assert type(model[0]) is nn.Linear  # nothing converted


def test_fake_quantize_twice_does_not_wrap_a_layer_twice_and_inputs_can_be_quantized_too() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    fake_quantize(model, group_size=16, exclude=(), inputs="minmax", input_options={"group_size": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no nn.Linear left"):
            fake_quantize(model, group_size=16, exclude=())
    x = torch.randn(2, 16)
    layer = model[0]
    _, xq = MinMaxQuantizer(group_size=16).quantize(x)
    _, wq = MinMaxQuantizer(group_size=16).quantize(layer.weight)
    assert torch.allclose(layer(x), F.linear(xq, wq, layer.bias))
    assert "minmax" in list_quantizers()


@pytest.mark.slow  # importing torchao takes ~1 s
def test_torchao_asymmetric_int4_is_a_zero_centred_grid_that_agrees_with_minmax_on_centred_weights() -> None:
    """Parity check (domain-anchors §2.6): torchao 0.18's ``IntxFakeQuantizeConfig(torch.int4, group_size=256,
    is_symmetric=False)`` uses the same scale (max − min)/15 but truncates its float zero point to 0, so its grid
    is [−8, 7]·scale around zero; the reference's grid sits at −zero·scale. They agree where −round(min/scale) = 8,
    and drift apart on groups that do not straddle zero (docs/low_precision.md, "4-bit training")."""
    pytest.importorskip("torchao")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 64, bias=False))
    w = model[0].weight.detach().clone()
    config = IntxFakeQuantizeConfig(torch.int4, group_size=256, is_symmetric=False)
    quantize_(model, QATConfig(weight_config=config, step="prepare"))
    ao = model[0].weight_fake_quantizer(model[0].weight).detach()
    g = w.reshape(-1, 256)
    scale = (g.amax(1, keepdim=True) - g.amin(1, keepdim=True)) / 15
    assert torch.allclose(ao, (torch.round(g / scale).clamp(-8, 7) * scale).reshape(w.shape), rtol=0, atol=1e-7)
    _, ours = MinMaxQuantizer(group_size=256).quantize(w)
    assert ((ours - ao).abs() <= 1e-7).float().mean() > 0.99  # centred Kaiming weights: a few edge values differ


def test_the_int4_recipes_fake_quantize_the_proxy_and_scale_stable_spams_reset_gap_to_the_run() -> None:
    from keel.proxy.sweep.recipes import resolve_recipe
    from keel.proxy.trainer import TrainConfig, _create_optimizer, build_model

    base = TrainConfig(size="tiny", steps=400, eval_batches=1)
    adamw = resolve_recipe("int4_adamw")[1](base)
    spam = resolve_recipe("int4_stable_spam")[1](base)
    assert adamw.optimizer == "adamw" and spam.optimizer == "stable_spam"
    model = build_model(spam)
    assert len(fake_quantized_layers(model)) == 8 and type(model.head) is nn.Linear
    group = _create_optimizer(model, spam).param_groups[0]
    # 500 of the paper's 20,000 updates → 10 of 400; γ1 0.7, γ2 0.9, γ3 0.999; β1/γ1 decayed over the whole run
    assert (group["reset_interval"], group["decay_steps"]) == (10, 400)
    assert (group["gamma1"], group["gamma2"], group["gamma3"]) == (0.7, 0.9, 0.999)
    assert spam.describe()["optimizer_options"]["reset_interval"] == 10
    assert "optimizer_options" not in base.describe()  # an unset field leaves stored sweep descriptions as they were


@pytest.mark.parametrize("bad", [{"lr": 1.0}, {"betas": (0.9, 0.9)}, [("reset_interval", 5)], {3: 1}])
def test_train_config_refuses_optimizer_options_that_are_not_extra_keyword_arguments(bad: object) -> None:
    from keel.proxy.trainer import TrainConfig

    with pytest.raises(ValueError, match=r"TrainConfig.optimizer_options=.*allowed: None or a dict"):
        TrainConfig(optimizer_options=bad)  # type: ignore[arg-type]
