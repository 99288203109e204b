"""Attention entropy (statistic and probe) against float64 references and the models' own attention maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from keel.signals.attention_stats import attention_entropy, attention_entropy_sums
from keel.signals.attn_entropy import AttnEntropyConfig, AttnEntropyProbe
from tests.signals.attention_models import (
    CausalSelfAttention,
    FlashSelfAttention,
    TwoLayer,
    block_inputs,
    explicit_logits,
    ref_stats,
)
from tests.signals.test_attn_logits import causal_logits


@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)]
)
def test_entropy_matches_float64_reference(dtype, rtol):
    z = causal_logits().to(dtype)
    _, expected = ref_stats(z.double().numpy())  # reference on the rounded logits: entropy is computed in fp32
    np.testing.assert_allclose(attention_entropy(z).numpy(), expected, rtol=rtol)


def test_fully_masked_rows_are_left_out():
    z = causal_logits().float()
    z[0, 1, 2, :] = -math.inf  # one fully masked row
    z[1, 0, 4, :] = torch.finfo(torch.float32).min  # one row masked the Hugging Face way
    _, expected = ref_stats(z.numpy())
    np.testing.assert_allclose(attention_entropy(z).numpy(), expected, rtol=1e-5)
    sums, counts, _ = attention_entropy_sums(z)
    assert counts.tolist() == [9.0, 9.0, 10.0]  # 2 batches × 5 rows per head, minus the two masked rows
    assert torch.isnan(attention_entropy(torch.full((1, 1, 2, 3), -math.inf))).all()


def test_uniform_one_hot_nan_and_empty():
    assert attention_entropy(torch.zeros(1, 2, 3, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    one_hot = torch.full((1, 1, 2, 4), -1e4)
    one_hot[..., 0] = 1e4
    assert attention_entropy(one_hot).tolist() == [0.0]
    z = torch.zeros(1, 2, 3, 4)
    z[0, 1, 0, 0] = math.nan
    got = attention_entropy(z)
    assert got[0] == pytest.approx(math.log(4)) and math.isnan(got[1])
    assert attention_entropy(torch.zeros(0, 2, 3, 4)).isnan().all()


def test_model_probabilities_are_reused_only_in_full_precision():
    z = causal_logits().float()
    p = torch.softmax(z, dim=-1)
    torch.testing.assert_close(attention_entropy_sums(z, p)[0], attention_entropy_sums(z)[0])
    rounded = p.to(torch.bfloat16)  # a bf16 softmax is not reused: the entropy comes from the logits
    torch.testing.assert_close(attention_entropy_sums(z, rounded)[0], attention_entropy_sums(z)[0])


def per_head(probe: AttnEntropyProbe) -> dict[str, float]:
    family = probe.read()["attn/head_entropy/"]
    return dict(zip(family.names, family.values.tolist(), strict=True))


@pytest.mark.parametrize("layer", [CausalSelfAttention, FlashSelfAttention], ids=["explicit_softmax", "sdpa"])
def test_probe_per_head_matches_reference(layer):
    torch.manual_seed(0)
    model = TwoLayer(layer)
    idx = torch.randint(0, 11, (3, 7))
    probe = AttnEntropyProbe(every=1)
    probe.attach(model)
    model(idx)
    got = per_head(probe)
    for i, (block, x) in enumerate(zip(model.blocks, block_inputs(model, idx), strict=True)):
        _, expected = ref_stats(explicit_logits(block, x).numpy())
        for h, value in enumerate(expected):
            assert got[f"blocks.{i}/h{h}"] == pytest.approx(value, rel=1e-5)
    probe.detach()


def test_probe_on_multihead_attention_matches_its_own_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 5, 16)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2, 4] = True
    probe = AttnEntropyProbe(every=1)
    probe.attach(mha)
    _, weights = mha(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    got = per_head(probe)
    p = weights.detach().double()  # (B, H, L, S): MHA's own probabilities, an independent reference
    expected = (-torch.special.xlogy(p, p).sum(-1)).mean(dim=(0, 2))
    for h in range(4):
        assert got[f"MultiheadAttention/h{h}"] == pytest.approx(float(expected[h]), rel=1e-5)


def test_schedule_and_layer_mean():
    torch.manual_seed(0)
    model = TwoLayer(CausalSelfAttention)
    probe = AttnEntropyProbe(every=2)
    probe.attach(model)
    seen = []
    for step in range(4):
        model(torch.randint(0, 11, (2, 5)))
        out = probe.measure(_ctx(step))
        seen.append(bool(out))
        if out:
            layers = out["attn/entropy/"].values
            assert float(out["attn/entropy"]) == pytest.approx(float(layers.mean()))
    assert seen == [True, False, True, False]
    probe.detach()


def test_config_validation():
    with pytest.raises(ValueError, match=r"AttnEntropyConfig.every=0; allowed: an int >= 1"):
        AttnEntropyConfig(every=0)


def _ctx(step: int):
    from tests.signals.test_attn_logits import _ctx as ctx

    return ctx(step)


def hf_model(kind: str, impl: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            vocab_size=64,
            n_positions=32,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation=impl,
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        attn_implementation=impl,
    )  # GQA
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hugging_face_eager_and_sdpa_match_the_models_attention_maps(kind):
    from keel.signals.attn_logits import AttnLogitsProbe

    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("eager", "sdpa"):
        model = hf_model(kind, impl).train()
        ent, top = AttnEntropyProbe(every=1), AttnLogitsProbe(fused_every=1)
        ent.attach(model)
        top.attach(model)
        out = model(idx, output_attentions=impl == "eager")
        results[impl] = (ent.read()["attn/entropy/"].values, top.read()["attn/max_logit/"].values)
        if impl == "eager":  # the model's own probabilities are the reference
            expected = [
                float((-torch.special.xlogy(p.detach().double(), p.detach().double()).sum(-1)).mean())
                for p in out.attentions
            ]
            np.testing.assert_allclose(results[impl][0].numpy(), expected, rtol=1e-5)
        ent.detach()
        top.detach()
    torch.testing.assert_close(results["eager"][0], results["sdpa"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], rtol=1e-5, atol=1e-6)


def test_multihead_attention_with_a_fully_masked_query_row_leaves_it_out():
    """A query row with every key masked (MHA outputs NaN there): max logit and entropy come from the other
    rows, as the float64 reference computes them."""
    from keel.signals.attn_logits import AttnLogitsProbe

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2, :] = True  # query 2 may see nothing
    ent, top = AttnEntropyProbe(every=1), AttnLogitsProbe(fused_every=1)
    ent.attach(mha)
    top.attach(mha)
    mha(x, x, x, attn_mask=mask, need_weights=False)
    w_q, w_k, _ = mha.in_proj_weight.double().chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.double().chunk(3)
    q = (x.double() @ w_q.T + b_q).view(2, 4, 2, 4).transpose(1, 2)
    k = (x.double() @ w_k.T + b_k).view(2, 4, 2, 4).transpose(1, 2)
    z = (q @ k.transpose(-2, -1) / 2.0).masked_fill(mask, -math.inf).detach()
    expected_top, expected_heads = ref_stats(z.numpy())
    got = per_head(ent)
    assert all(math.isfinite(v) for v in got.values())
    assert [got[f"MultiheadAttention/h{h}"] for h in range(2)] == pytest.approx(expected_heads.tolist(), rel=1e-5)
    assert float(top.read()["attn/max_logit"]) == pytest.approx(expected_top, rel=1e-5)
