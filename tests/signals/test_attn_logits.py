"""The attention max-logit statistic and probe, against float64 references on every attention flavour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keel.proxy import create_proxy_model
from keel.signals import NoAttentionFoundWarning, quiet
from keel.signals.attention_stats import attention_max_logit, sdpa_logits
from keel.signals.attn_logits import AttnLogitsConfig, AttnLogitsProbe
from tests.signals.attention_models import (
    CausalSelfAttention,
    FlashSelfAttention,
    TwoLayer,
    block_inputs,
    explicit_logits,
    ref_stats,
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def causal_logits(shape=(2, 3, 5, 5), seed=0, scale=3.0) -> torch.Tensor:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    keep = torch.ones(shape[-2], shape[-1], dtype=torch.bool).tril()
    return z.masked_fill(~keep, -math.inf)


# --- the pure statistic ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_logit_matches_float64_reference(dtype):
    z = causal_logits().to(dtype)
    expected, _ = ref_stats(z.double().numpy())  # the max is exact in any precision: compare with rounded input
    got = attention_max_logit(z)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_max_logit_is_signed_and_ignores_masks():
    z = torch.tensor([[-5.0, -math.inf], [-3.0, -7.0]])
    assert float(attention_max_logit(z)) == -3.0  # the signed maximum, not max |z|
    additive = torch.tensor([[2.0, torch.finfo(torch.float32).min], [1.0, 0.5]])
    assert float(attention_max_logit(additive)) == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_masked_input_gives_minus_inf(dtype):
    assert attention_max_logit(torch.full((2, 4), -math.inf, dtype=dtype)) == -math.inf
    hf_mask = torch.full((2, 4), torch.finfo(dtype).min, dtype=dtype)  # Hugging Face's additive mask
    assert attention_max_logit(hf_mask) == -math.inf


def test_nan_propagates_and_zeros_and_empty():
    z = causal_logits()
    z[0, 1, 3, 0] = math.nan
    assert math.isnan(float(attention_max_logit(z)))
    assert float(attention_max_logit(torch.zeros(2, 2, 3, 3))) == 0.0
    assert float(attention_max_logit(torch.zeros(0, 4))) == -math.inf
    inf = torch.zeros(3)
    inf[1] = math.inf
    assert float(attention_max_logit(inf)) == math.inf


@pytest.mark.parametrize("case", ["causal", "bool_mask", "float_mask", "scale", "gqa"])
def test_sdpa_logits_reproduce_torch_kernel(case):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    kwargs: dict = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(6, 6, generator=g) > 0.3
        kwargs["attn_mask"][:, 0] = True  # no fully masked row: the kernel's output there is undefined
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 6, 6, generator=g)
    elif case == "scale":
        kwargs["scale"] = 0.05
    else:
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    logits = sdpa_logits(
        q,
        k,
        kwargs.get("attn_mask"),
        is_causal=kwargs.get("is_causal", False),
        scale=kwargs.get("scale"),
        enable_gqa=kwargs.get("enable_gqa", False),
    )
    v_full = v.repeat_interleave(2, dim=1) if case == "gqa" else v
    torch.testing.assert_close(logits.softmax(-1) @ v_full, expected, rtol=1e-5, atol=1e-5)


# --- the probe on each attention flavour ------------------------------------------------------------------
def read_layers(probe: AttnLogitsProbe) -> dict[str, float]:
    values = probe.read()
    family = values["attn/max_logit/"]
    out = dict(zip(family.names, family.values.tolist(), strict=True))
    assert float(values["attn/max_logit"]) == max(out.values())
    return out


@pytest.mark.parametrize("layer", [CausalSelfAttention, FlashSelfAttention], ids=["explicit_softmax", "sdpa"])
def test_probe_matches_explicit_reference_on_nanogpt_blocks(layer):
    torch.manual_seed(0)
    model = TwoLayer(layer)
    idx = torch.randint(0, 11, (3, 7))
    probe = AttnLogitsProbe(fused_every=1)
    probe.attach(model)
    model(idx)
    got = read_layers(probe)
    for name, block, x in zip(["blocks.0", "blocks.1"], model.blocks, block_inputs(model, idx), strict=True):
        expected, _ = ref_stats(explicit_logits(block, x).numpy())
        assert got[name] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    probe.detach()


def test_probe_on_proxy_model_matches_manual_logits():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    idx = torch.randint(0, 256, (2, 16))
    probe = AttnLogitsProbe()
    probe.attach(model)
    model(idx)
    got = read_layers(probe)
    inputs = []
    handles = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    for i, (block, x) in enumerate(zip(model.blocks, inputs, strict=True)):
        attn = block.attn
        q, k, _ = (x.double() @ attn.qkv.weight.double().T).split(x.shape[-1], dim=-1)
        shape = (2, 16, attn.n_heads, attn.head_dim)
        q, k = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2)
        z = (q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)).masked_fill(~attn.causal_mask, -math.inf)
        expected, _ = ref_stats(z.detach().numpy())
        assert got[f"blocks.{i}.attn"] == pytest.approx(expected, rel=1e-5)
    probe.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probe_on_low_precision_model(dtype):
    torch.manual_seed(0)
    model = TwoLayer(CausalSelfAttention).to(dtype)
    idx = torch.randint(0, 11, (2, 6))
    probe = AttnLogitsProbe()
    probe.attach(model)
    model(idx)
    got = read_layers(probe)
    seen = []
    handles = [b.register_forward_hook(lambda m, a, o: seen.append(a[0])) for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    for name, block, x in zip(["blocks.0", "blocks.1"], model.blocks, seen, strict=True):
        q, k, _ = block.qk(x)  # the model's own low-precision q and k: the logits it really uses
        z = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        expected, _ = ref_stats(z.detach().double().masked_fill(~causal, -math.inf).numpy())
        assert got[name] == pytest.approx(expected, rel=1e-2)
    probe.detach()


@pytest.mark.parametrize("batch_first", [True, False])
def test_probe_on_multihead_attention_with_masks(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True  # sequence 1 has two padding keys
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = not allowed, MHA's convention
    probe = AttnLogitsProbe(fused_every=1)
    probe.attach(mha)
    mha(x, x, x, key_padding_mask=pad, attn_mask=causal)
    got = float(probe.read()["attn/max_logit"])
    xb = x if batch_first else x.transpose(0, 1)
    w_q, w_k, _ = mha.in_proj_weight.double().chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.double().chunk(3)
    q = (xb.double() @ w_q.T + b_q).view(3, 5, 4, 4).transpose(1, 2)
    k = (xb.double() @ w_k.T + b_k).view(3, 5, 4, 4).transpose(1, 2)
    z = (q @ k.transpose(-2, -1) / 2.0).masked_fill(causal, -math.inf).masked_fill(pad[:, None, None, :], -math.inf)
    expected, _ = ref_stats(z.detach().numpy())
    assert got == pytest.approx(expected, rel=1e-5)
    probe.detach()


# --- cadence, modes and side effects --------------------------------------------------------------------
def test_fused_sites_follow_their_own_schedule():
    torch.manual_seed(0)
    model = TwoLayer(FlashSelfAttention)
    probe = AttnLogitsProbe(every=1, fused_every=3)
    probe.attach(model)
    measured = []
    for step in range(7):
        model(torch.randint(0, 11, (2, 5)))
        measured.append(bool(probe.measure(_ctx(step))))
    assert measured == [True, False, False, True, False, False, True]
    probe.detach()


def test_eval_mode_and_quiet_are_not_measured_and_microbatches_take_the_max():
    torch.manual_seed(0)
    model = TwoLayer(CausalSelfAttention)
    probe = AttnLogitsProbe()
    probe.attach(model)
    model.eval()
    model(torch.randint(0, 11, (2, 5)))
    assert probe.read() == {}
    model.train()
    with quiet():
        model(torch.randint(0, 11, (2, 5)))
    assert probe.read() == {}
    a, b = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))
    model(a)
    first = float(probe.read()["attn/max_logit"])
    model(b)
    second = float(probe.read()["attn/max_logit"])
    model(a)
    model(b)  # two micro-batches of one step
    assert float(probe.read()["attn/max_logit"]) == max(first, second)
    probe.detach()


def test_probe_changes_nothing_and_detach_removes_hooks():
    torch.manual_seed(0)
    model = TwoLayer(CausalSelfAttention)
    idx = torch.randint(0, 11, (2, 5))
    bare = model(idx)
    bare.sum().backward()
    bare_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    probe = AttnLogitsProbe()
    probe.attach(model)
    watched = model(idx)
    watched.sum().backward()
    assert torch.equal(bare, watched)
    assert all(torch.equal(g, p.grad) for g, p in zip(bare_grads, model.parameters(), strict=True))
    probe.detach()
    model(idx)
    assert probe.read() == {}
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_no_attention_module_warns_only_for_sequence_models(recwarn):
    with pytest.warns(NoAttentionFoundWarning):
        AttnLogitsProbe().attach(nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 2)))
    AttnLogitsProbe().attach(nn.Sequential(nn.Linear(2, 2)))  # an MLP: nothing to say
    assert not [w for w in recwarn if issubclass(w.category, NoAttentionFoundWarning)]


def test_config_validation_names_field_value_and_allowed():
    with pytest.raises(ValueError, match=r"AttnLogitsConfig.fused_every=0; allowed: an int >= 1"):
        AttnLogitsConfig(fused_every=0)


def _ctx(step: int):
    from keel.signals import StepContext

    return StepContext(
        step=step,
        loss=torch.zeros(()),
        model=nn.Linear(1, 1),
        optimizer=None,  # type: ignore[arg-type]
        names=(),
        params=[],
        grads=[],
        log_step=False,
    )


def test_reference_helper_is_itself_right():
    # uniform attention over n keys has entropy log n; the helper must agree with that closed form
    _, heads = ref_stats(np.zeros((1, 2, 3, 4)))
    np.testing.assert_allclose(heads, [math.log(4)] * 2)


def test_a_logits_tap_is_hooked_instead_of_intercepting():
    model = create_proxy_model("tiny", seq_len=8)
    probe = AttnLogitsProbe()
    probe.attach(model)
    attn = model.blocks[0].attn
    assert attn.logits_tap._forward_hooks and not attn._forward_pre_hooks  # no TorchFunctionMode for this site
    probe.detach()
    assert not attn.logits_tap._forward_hooks
