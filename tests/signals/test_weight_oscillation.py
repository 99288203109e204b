"""The weight-oscillation probe (OFQ's TrackOscillation): hand-computed code sequences, the share against a float64
EMA reference, keel's and torchao's fake-quantized layers, its memory, and bad settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel._core import keys
from keel.nn import fake_quantize
from keel.signals.weight_oscillation import (
    WeightOscillationConfig,
    WeightOscillationProbe,
    _qvalue_bounds,
    find_quantized_layers,
    new_state,
    torchao_codes,
    torchao_int4_codes,
    track_oscillation_,
)

from .contexts import step_context


def oscillations(sequence: list[int]) -> list[bool]:
    state = new_state(torch.tensor([sequence[0]], dtype=torch.int8))
    return [bool(track_oscillation_(state, torch.tensor([c], dtype=torch.int8))) for c in sequence[1:]]


def reference_ema(sequence: list[int], momentum: float = 0.01) -> float:
    """OFQ's rule in plain Python floats: a switch reversing the previous switch's direction is an oscillation."""
    ema, prev_dir = 0.0, 0
    for prev, code in zip(sequence, sequence[1:], strict=False):
        direction = (code > prev) - (code < prev)
        ema = (1 - momentum) * ema + momentum * float(direction * prev_dir == -1)
        prev_dir = direction if direction else prev_dir
    return ema


def test_codes_flipping_back_and_forth_oscillate_and_a_steady_climb_does_not() -> None:
    assert oscillations([1, 2, 1, 2, 1]) == [False, True, True, True]  # the first switch has nothing to reverse
    assert oscillations([1, 2, 3]) == [False, False]
    assert oscillations([3, 2, 1, 0]) == [False, False, False]


def test_a_reversal_after_a_pause_still_counts_and_a_jump_of_two_is_one_switch() -> None:
    assert oscillations([1, 2, 2, 2, 1]) == [False, False, False, True]  # the direction outlives the pause
    assert oscillations([0, 3, 1]) == [False, True]


def test_ema_of_an_alternating_weight_matches_the_hand_computation() -> None:
    # codes 1,2,1,2,…: oscillations from the 2nd change on; after k of them the EMA is 1 − 0.99^k
    state = new_state(torch.tensor([1], dtype=torch.int8))
    for i in range(1, 12):
        track_oscillation_(state, torch.tensor([1 + i % 2], dtype=torch.int8))
    assert state.ema.item() == pytest.approx(1 - 0.99**10, rel=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.integers(-8, 7), min_size=1, max_size=60))
def test_ema_matches_the_reference_rule_on_any_code_sequence(sequence: list[int]) -> None:
    state = new_state(torch.tensor([sequence[0]], dtype=torch.int8))
    for c in sequence[1:]:
        track_oscillation_(state, torch.tensor([c], dtype=torch.int8))
    assert state.ema.item() == pytest.approx(reference_ema(sequence), rel=1e-5, abs=1e-9)


class Scripted(nn.Module):
    """A stand-in fake-quantized layer whose codes follow a script, one row of codes per step."""

    def __init__(self, script: list[list[int]]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(len(script[0])))
        self.script, self.i = script, 0

    def quantized_codes(self) -> torch.Tensor:
        codes = torch.tensor(self.script[min(self.i, len(self.script) - 1)], dtype=torch.int8)
        self.i += 1
        return codes


# the probe never reads the optimizer; a stand-in spares the first torch.optim use (seconds of lazy imports)
NO_OPTIMIZER: torch.optim.Optimizer = object()  # type: ignore[assignment]


def shares(probe: WeightOscillationProbe, model: nn.Module, steps: int) -> list[float]:
    opt = NO_OPTIMIZER
    probe.attach(model)
    return [probe.measure(step_context(model, opt, step=s))[keys.QAT_OSCILLATION].item() for s in range(steps)]


def test_share_counts_a_weight_once_its_ema_passes_the_threshold() -> None:
    # weight 0 alternates; its oscillations at measures 3, 4, 5 lift the EMA to 0.01, 0.0199, 0.0297: > 0.02 at the 5th
    script = [[1 + i % 2, 0, 1, 5 + i] for i in range(8)]  # the others: constant, constant, a steady climb
    assert shares(WeightOscillationProbe(), Scripted(script), 6) == [0.0, 0.0, 0.0, 0.0, 0.25, 0.25]


def test_the_largest_layer_share_is_the_signal_and_each_layer_has_its_own_key() -> None:
    model = nn.Sequential(Scripted([[i % 2, i % 2] for i in range(9)]), Scripted([[i % 2, 0, 0, 0] for i in range(9)]))
    probe = WeightOscillationProbe(threshold=0.0)
    opt = NO_OPTIMIZER
    probe.attach(model)
    out = {}
    for s in range(4):
        out = probe.measure(step_context(model, opt, step=s))
    assert out[keys.QAT_OSCILLATION].item() == 1.0
    family = out[keys.QAT_OSCILLATION_PER_LAYER]
    assert family.names == ("0", "1") and family.values.tolist() == [1.0, 0.25]


def test_probe_is_silent_and_holds_nothing_on_a_model_without_quantized_layers() -> None:
    model = nn.Linear(3, 3)
    probe = WeightOscillationProbe()
    assert probe.measure(step_context(model, NO_OPTIMIZER)) == {}
    assert probe.state_bytes() == 0


def test_statsq_layers_are_found_and_their_state_costs_six_bytes_per_weight() -> None:
    torch.manual_seed(0)
    model = fake_quantize(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), "statsq", bits=2)
    assert [layer.name for layer in find_quantized_layers(model)] == ["0", "2"]
    probe = WeightOscillationProbe()
    shares(probe, model, 2)
    assert probe.state_bytes() == 6 * (16 * 32 + 32 * 4)  # int8 code + int8 direction + float32 EMA


class FakeIntxQuantizer(nn.Module):
    """torchao's IntxFakeQuantizer layout (scale, zero_point, config with dtype/granularity), without torchao."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.scale, self.zero_point, self.enabled = scale, zero_point, True

        class Granularity:
            pass

        granularity = Granularity()
        granularity.group_size = group_size  # type: ignore[attr-defined]
        self.config = type("Config", (), {"dtype": torch.int4, "granularity": granularity})()


def test_torchao_layout_codes_are_round_w_over_scale_plus_zero_point_clamped_per_group() -> None:
    # groups of 2: scales 0.5 and 0.25, zero points 0 and 1; 0.25/0.5 = 0.5 rounds to 0 (half to even);
    # 9/0.25 + 1 = 37 clamps to int4's 7, −4/0.5 = −8 stays
    weight = torch.tensor([[0.25, -4.0, 9.0, -0.1]])
    q = FakeIntxQuantizer(torch.tensor([[0.5, 0.25]]), torch.tensor([[0, 1]]), group_size=2)
    assert torchao_codes(weight, q).tolist() == [[0, -8, 7, 1]]
    q.enabled = False
    assert torchao_codes(weight, q) is None


class FakeInt4WeightQuantizer(nn.Module):
    """torchao's Int4WeightFakeQuantizer layout (``QATConfig(Int4WeightOnlyConfig(...))``): no stored scale, a config
    with ``group_size`` and ``activation_dtype``, without torchao."""

    def __init__(self, group_size: int, activation_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.enabled = True
        self.config = type("Config", (), {"group_size": group_size, "activation_dtype": activation_dtype})()


def test_torchao_int4_weight_only_layout_is_found_and_its_codes_are_asymmetric_min_max_per_group() -> None:
    # one group of 4: min −1, max 2 → scale 3/15 = 0.2; (w − min)/scale = 0, 5, 7.5 → 8 (half to even), 15
    weight = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q = FakeInt4WeightQuantizer(group_size=4)
    assert torchao_int4_codes(weight, q).tolist() == [[0, 5, 8, 15]]
    layer = nn.Linear(4, 1)
    layer.weight_fake_quantizer = q  # type: ignore[assignment]
    assert [found.name for found in find_quantized_layers(nn.Sequential(layer))] == ["0"]
    q.enabled = False
    assert torchao_int4_codes(weight, q) is None
    # the fp8-activation variant quantizes to float8 first: its codes are not computed here
    assert torchao_int4_codes(weight, FakeInt4WeightQuantizer(4, activation_dtype=torch.float8_e4m3fn)) is None


@pytest.mark.slow  # importing torchao takes seconds
def test_torchao_int4_weight_only_qat_codes_reproduce_its_fake_quantized_weight() -> None:
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization.qat import QATConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    torchao.quantization.quantize_(model, QATConfig(Int4WeightOnlyConfig(group_size=32), step="prepare"))
    layers = find_quantized_layers(model)
    assert [layer.name for layer in layers] == ["0", "2"]
    for module in (model[0], model[2]):
        w = module.weight.detach()
        fq = module.weight_fake_quantizer(w).reshape(w.shape[0], -1, 32)  # torchao's own fake-quantized weight
        groups = w.reshape(w.shape[0], -1, 32)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low).clamp_min(1e-6) / 15
        codes = torchao_int4_codes(module.weight, module.weight_fake_quantizer).reshape(groups.shape)
        torch.testing.assert_close(codes.float() * scale + low, fq, rtol=0, atol=1e-6)
    probe = WeightOscillationProbe(threshold=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    out = {}
    for step in range(6):
        model(torch.randn(16, 64)).square().mean().backward()
        out = probe.measure(step_context(model, opt, step=step))
        opt.step()
        opt.zero_grad()
    assert 0.0 < out[keys.QAT_OSCILLATION].item() <= 1.0


@pytest.mark.slow  # importing torchao takes seconds
def test_torchao_qat_codes_equal_torchaos_own_quantization_and_oscillation_is_tracked() -> None:
    torchao = pytest.importorskip("torchao")
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, _do_fake_quantize_affine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    torchao.quantization.quantize_(
        model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare")
    )
    layers = find_quantized_layers(model)
    assert [layer.name for layer in layers] == ["0", "2"] and layers[0].codes() is None  # no forward yet: no scale
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    probe = WeightOscillationProbe(threshold=0.0)
    probe.attach(model)
    out = {}
    for step in range(6):
        model(torch.randn(16, 64)).square().mean().backward()
        out = probe.measure(step_context(model, opt, step=step))
        opt.step()
        opt.zero_grad()
    for module in (model[0], model[2]):
        fq = module.weight_fake_quantizer
        qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[fq.config.dtype]
        model(torch.randn(2, 64))
        q, _ = _do_fake_quantize_affine(
            module.weight.detach(), (1, 32), fq.scale, fq.zero_point, torch.int32, qmin, qmax
        )
        assert torch.equal(torchao_codes(module.weight, fq).to(torch.int32), q.to(torch.int32))
    assert 0.0 < out[keys.QAT_OSCILLATION].item() <= 1.0
    assert {str(d): _qvalue_bounds(d) for d in _DTYPE_TO_QVALUE_BOUNDS} == {
        str(d): tuple(b) for d, b in _DTYPE_TO_QVALUE_BOUNDS.items()
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [("momentum", 0.0), ("momentum", 1.0), ("momentum", "x"), ("threshold", -0.1), ("threshold", 1.0)],
)
def test_bad_settings_name_the_field_and_the_allowed_range(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{field}=.*allowed"):
        WeightOscillationConfig(**{field: value})  # type: ignore[arg-type]
