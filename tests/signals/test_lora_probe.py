"""The LoRA probe: ‖A‖, ‖B‖ and ‖ΔW‖ = scaling·‖B·A‖ against a float64 reference, on peft and keel-style adapters,
edge values (zero B, NaN, Inf, bf16), the frozen base left alone, and a real peft model trained under Guard."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel._core import keys
from keel.guard import Guard
from keel.signals import LoraProbe, LoraProbeConfig, find_adapters, lora_norms
from tests.signals.contexts import step_context

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from tests.tiny_hf import tiny_llama  # noqa: E402


def _peft_llama(**lora: object) -> nn.Module:
    torch.manual_seed(0)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora})
    return peft.get_peft_model(tiny_llama(), config)


def _reference(a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[float, float, float]:
    """‖A‖, ‖B‖ and scaling·‖B·A‖ in float64, with ΔW formed explicitly."""
    a64, b64 = a.detach().double().flatten(1), b.detach().double().flatten(1)
    return a64.norm().item(), b64.norm().item(), scaling * (b64 @ a64).norm().item()


def _measure(model: nn.Module, probe: LoraProbe | None = None, step: int = 0) -> dict:
    probe = probe or LoraProbe()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return probe.measure(step_context(model, opt, step=step))


# --- the pure function: the trace identity against ΔW formed in float64 ----------------------------------------------
@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 3),
    r=st.integers(1, 6),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_lora_norms_match_the_float64_norm_of_b_times_a(n, r, d_in, d_out, scale, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, r, d_in, generator=g, dtype=torch.float64) * scale
    b = torch.randn(n, d_out, r, generator=g, dtype=torch.float64)
    a_norm, b_norm, ba_norm = lora_norms(a.float(), b.float())
    for i in range(n):
        ra, rb, rba = _reference(a[i], b[i], 1.0)
        assert a_norm[i].item() == pytest.approx(ra, rel=1e-5)
        assert b_norm[i].item() == pytest.approx(rb, rel=1e-5)
        # the trace sums terms of both signs: absolute error ~1e-7·‖A‖²‖B‖² on the square (module docstring)
        assert ba_norm[i].item() ** 2 == pytest.approx(rba**2, rel=1e-5, abs=1e-6 * (ra * rb) ** 2)


def test_zero_b_gives_zero_update_and_a_non_finite_adapter_shows():
    a = torch.randn(3, 2, 5)
    b = torch.zeros(3, 4, 2)
    b[1, 0, 0] = math.nan
    b[2, 3, 1] = math.inf
    a_norm, b_norm, ba_norm = lora_norms(a, b)
    assert b_norm[0].item() == 0.0 and ba_norm[0].item() == 0.0  # B starts at zero: ΔW = 0, not NaN
    assert math.isnan(b_norm[1].item()) and math.isnan(ba_norm[1].item())
    assert math.isinf(b_norm[2].item()) and not math.isfinite(ba_norm[2].item())
    assert torch.isfinite(a_norm).all()


def test_bf16_adapters_are_reduced_in_float32():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 4, 64, generator=g).bfloat16()
    b = torch.randn(2, 48, 4, generator=g).bfloat16()
    out = lora_norms(a, b)
    assert all(v.dtype == torch.float32 for v in out)
    for i in range(2):
        ref = _reference(a[i], b[i], 1.0)  # the bf16 values, exactly, in float64
        assert [v[i].item() for v in out] == pytest.approx(ref, rel=1e-4)


# --- the probe on peft and keel-style adapters ------------------------------------------------------------------------
def test_peft_adapters_are_found_by_their_modules_and_measured_against_float64():
    model = _peft_llama()
    with torch.no_grad():  # B leaves zero, as after some training
        for ad in find_adapters(model):
            ad.b.normal_()
    names = [ad.name for ad in find_adapters(model)]
    assert names == [f"base_model.model.model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    out = _measure(model)
    a_names, a_norm = out[keys.LORA_A_NORM_PER_MODULE]
    b_norm = dict(zip(*out[keys.LORA_B_NORM_PER_MODULE], strict=True))
    delta = dict(zip(*out[keys.LORA_DELTA_NORM_PER_MODULE], strict=True))
    assert sorted(a_names) == sorted(names)  # grouped by shape (q_proj and v_proj differ under GQA), each named
    ratios = []
    for ad, a in zip(a_names, a_norm, strict=True):
        module = model.get_submodule(ad)
        ra, rb, rdelta = _reference(module.lora_A["default"].weight, module.lora_B["default"].weight, 8 / 4)
        assert (a.item(), b_norm[ad].item(), delta[ad].item()) == pytest.approx((ra, rb, rdelta), rel=1e-5)
        ratios.append(rdelta / module.base_layer.weight.double().norm().item())
    assert out[keys.LORA_DELTA_NORM_MAX].item() == pytest.approx(max(v.item() for v in delta.values()), rel=1e-6)
    assert out[keys.LORA_DELTA_RATIO_MAX].item() == pytest.approx(max(ratios), rel=1e-5)
    assert all(out[k].dim() == 0 for k in (keys.LORA_DELTA_NORM_MAX, keys.LORA_DELTA_RATIO_MAX))  # 0-d, on device


def test_rslora_scaling_and_a_scaling_changed_mid_run_are_read_each_time():
    model = _peft_llama(use_rslora=True)
    with torch.no_grad():
        for ad in find_adapters(model):
            ad.b.fill_(0.1)
    probe = LoraProbe()
    first = _measure(model, probe)[keys.LORA_DELTA_NORM_MAX].item()
    ad = find_adapters(model)[0]
    assert ad.scaling() == pytest.approx(8 / math.sqrt(4))  # rsLoRA: α/√r
    for module in {a.module for a in find_adapters(model)}:
        module.scaling["default"] *= 0.5  # peft's scale_layer does this
    assert _measure(model, probe, step=1)[keys.LORA_DELTA_NORM_MAX].item() == pytest.approx(first / 2, rel=1e-6)


def test_embedding_adapters_and_several_adapters_are_named():
    model = _peft_llama(target_modules=["embed_tokens", "q_proj"])
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    names = [ad.name for ad in find_adapters(model)]
    assert "base_model.model.model.embed_tokens" in names
    assert "base_model.model.model.layers.0.self_attn.q_proj/second" in names
    emb = next(ad for ad in find_adapters(model) if ad.name.endswith("embed_tokens"))
    with torch.no_grad():
        emb.b.normal_()
    out = _measure(model)
    got = dict(zip(*out[keys.LORA_DELTA_NORM_PER_MODULE], strict=True))
    m = emb.module
    expected = _reference(m.lora_embedding_A["default"], m.lora_embedding_B["default"], m.scaling["default"])[2]
    assert got[emb.name].item() == pytest.approx(expected, rel=1e-5)


class _KeelStyleLoRA(nn.Module):
    """The layout of keel's scenario adapters: ``lora_a`` / ``lora_b`` parameters, a float ``scaling``, ``base``."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(6, 5).requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(3, 6))
        self.lora_b = nn.Parameter(torch.randn(5, 3))
        self.scaling = 2.5


def test_keel_style_adapters_are_found_and_a_model_without_adapters_emits_nothing():
    model = nn.Sequential(_KeelStyleLoRA(), nn.ReLU())
    out = _measure(model)
    _, rdelta = _reference(model[0].lora_a, model[0].lora_b, 2.5)[1:]
    assert out[keys.LORA_DELTA_NORM_PER_MODULE][0] == ("0",)
    assert out[keys.LORA_DELTA_NORM_MAX].item() == pytest.approx(rdelta, rel=1e-5)
    assert out[keys.LORA_DELTA_RATIO_MAX].item() == pytest.approx(rdelta / model[0].base.weight.norm().item(), rel=1e-5)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    probe = LoraProbe()
    probe.attach(plain)
    assert probe.adapters == [] and _measure(plain, probe) == {}


def test_a_4_bit_base_gives_no_ratio_and_the_cadence_and_config_are_checked():
    model = nn.Sequential(_KeelStyleLoRA())
    model[0].base.weight = nn.Parameter(torch.zeros(5, 6, dtype=torch.uint8), requires_grad=False)  # packed codes
    out = _measure(model)
    assert keys.LORA_DELTA_RATIO_MAX not in out and keys.LORA_DELTA_NORM_MAX in out
    probe = LoraProbe(every=3, per_module=False)
    assert set(_measure(model, probe, step=3)) == {keys.LORA_DELTA_NORM_MAX}
    assert _measure(model, probe, step=4) == {}
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises((ValueError, TypeError), match="every"):
            LoraProbeConfig(every=bad)


def test_the_frozen_base_norm_is_measured_once_and_again_only_when_trained():
    model = nn.Sequential(_KeelStyleLoRA())
    probe = LoraProbe()
    _measure(model, probe)
    cached = probe._base_norms
    _measure(model, probe, step=1)
    assert probe._base_norms is cached  # frozen: not re-read
    model[0].base.weight.requires_grad_(True)
    with torch.no_grad():
        model[0].base.weight.mul_(2)
    ratio = _measure(model, probe, step=2)[keys.LORA_DELTA_RATIO_MAX].item()
    assert probe._base_norms is not cached
    expected = _reference(model[0].lora_a, model[0].lora_b, 2.5)[2] / model[0].base.weight.norm().item()
    assert ratio == pytest.approx(expected, rel=1e-5)


# --- a real peft model under Guard ---------------------------------------------------------------------------------
def test_a_peft_llama_trains_under_guard_and_the_frozen_base_costs_the_per_parameter_probes_nothing(tmp_path):
    from keel.store import RunReader

    model = _peft_llama()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 10 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with Guard(model, opt, run_dir=str(tmp_path), policy="recover", log_every=2) as guard:
        for _ in range(6):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            guard.step(out.loss)
            opt.zero_grad(set_to_none=True)
    assert [f for f in guard.findings if f.kind == "keel_error"] == []
    assert [d for d in guard.decisions if d.action != "ok"] == []
    reader = RunReader(tmp_path)
    stored = set(reader.signal_keys())
    grad_norm_names = {
        k.removeprefix(keys.GRAD_NORM_PER_PARAM) for k in stored if k.startswith(keys.GRAD_NORM_PER_PARAM)
    }
    assert grad_norm_names == set(trainable)  # only the adapters: no frozen weight is read per step
    assert {keys.LORA_DELTA_NORM_MAX, keys.LORA_DELTA_RATIO_MAX} <= stored
    steps, ratio = reader.signal(keys.LORA_DELTA_RATIO_MAX)
    assert list(steps) == list(range(6)) and ratio[0] == 0.0 < ratio[-1]  # B starts at zero, then learns
