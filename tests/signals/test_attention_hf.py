"""Attention probes on Hugging Face GPT-2 and Llama (built from a config) against an explicit float64 q·kᵀ.

The reference recomputes each layer's logits from the layer's input (``output_hidden_states``) and its
weights — GPT-2's ``ln_1`` and ``c_attn``, Llama's ``input_layernorm``, ``q_proj``/``k_proj``, rotary
embedding and GQA — in float64, masks them (causal and left padding) and reduces them with
`ref_stats`. Left padding makes the padded queries' rows fully masked: they must be left out, on the
"eager" path (an additive finfo.min mask) as on the "sdpa" path (a fused kernel keel rebuilds from q, k).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from keel.signals.attn_entropy import AttnEntropyProbe
from keel.signals.attn_logits import AttnLogitsProbe
from tests.signals.attention_models import ref_stats

transformers = pytest.importorskip("transformers")

B, T, PAD = 2, 10, 4  # sequence 1 is left-padded by PAD tokens: its first PAD query rows are fully masked


def _gpt2(impl: str) -> torch.nn.Module:
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
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # larger q/k weights: logits of a few units, attention far from uniform
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8.0)
    return model


def _llama(impl: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        attn_implementation=impl,
    )  # GQA: 2 kv heads
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T): query i may see key j when j ≤ i and j is not padding."""
    return torch.ones(T, T, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]


def gpt2_reference_logits(model, hidden: tuple[torch.Tensor, ...], mask: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for block, h in zip(model.transformer.h, hidden, strict=False):
        ln, attn = block.ln_1, block.attn
        x = F.layer_norm(h.detach().double(), ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)
        q, k, _ = (x @ attn.c_attn.weight.double() + attn.c_attn.bias.double()).split(attn.embed_dim, dim=-1)
        shape = (B, T, attn.num_heads, attn.head_dim)
        q, k = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2)  # (B, H, T, hd)
        z = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)
        out.append(z.masked_fill(~_allowed(mask), -math.inf).detach())
    return out


def llama_reference_logits(model, hidden: tuple[torch.Tensor, ...], mask: torch.Tensor) -> list[torch.Tensor]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out = []
    rotary = model.model.rotary_emb
    for layer, h in zip(model.model.layers, hidden, strict=False):
        norm, attn = layer.input_layernorm, layer.self_attn
        x = h.detach().double()
        x = norm.weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        hd = attn.head_dim
        q = (x @ attn.q_proj.weight.double().T).view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = (x @ attn.k_proj.weight.double().T).view(B, T, -1, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() would pass; the model gets these too
        cos, sin = rotary(x, positions)
        q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        z = q @ k.transpose(-2, -1) / math.sqrt(hd)
        out.append(z.masked_fill(~_allowed(mask), -math.inf).detach())
    return out


MODELS = {"gpt2": (_gpt2, gpt2_reference_logits), "llama": (_llama, llama_reference_logits)}


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :PAD] = 0
    return idx, mask


def _measure(model, idx, mask, dtype=torch.float32):
    model = model.to(dtype).train()
    ent, top = AttnEntropyProbe(every=1), AttnLogitsProbe(fused_every=1)
    ent.attach(model)
    top.attach(model)
    kwargs = {"attention_mask": mask, "output_hidden_states": True}
    if "position_ids" in model.forward.__code__.co_varnames and isinstance(model, transformers.LlamaForCausalLM):
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(idx, **kwargs)
    heads, layers = ent.read()["attn/head_entropy/"], top.read()["attn/max_logit/"]
    ent.detach()
    top.detach()
    return out, dict(zip(heads.names, heads.values.tolist(), strict=True)), layers.values.tolist()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hugging_face_probes_match_explicit_float64_attention(kind, impl):
    build, reference = MODELS[kind]
    model = build(impl)
    idx, mask = _inputs()
    out, heads, layers = _measure(model, idx, mask)
    refs = reference(model, out.hidden_states, mask)
    assert len(layers) == len(refs) == 2
    for i, z in enumerate(refs):
        top, per_head = ref_stats(z.numpy())
        assert layers[i] == pytest.approx(top, rel=1e-5)
        got = [
            v
            for name, v in heads.items()
            if name.split("/")[0].endswith(f".{i}.attn") or name.split("/")[0].endswith(f".{i}.self_attn")
        ]
        assert len(got) == len(per_head)
        assert got == pytest.approx(per_head.tolist(), rel=1e-4)
    # the padded queries' rows are fully masked, and were left out: counted as the uniform rows an eager
    # softmax over finfo.min gives them, the mean entropy would differ
    z = refs[0]
    dead = (z == -math.inf).all(-1)  # (B, H, T)
    assert int(dead.sum()) == PAD * z.shape[1]
    rows = (~dead).sum(dim=(0, 2)).double()
    _, kept = ref_stats(z.numpy())
    with_dead = (torch.from_numpy(kept) * rows + dead.sum(dim=(0, 2)) * math.log(T)) / (rows + dead.sum(dim=(0, 2)))
    layer0 = [v for name, v in heads.items() if ".0." in name]
    assert all(abs(a - b) > 1e-2 for a, b in zip(layer0, with_dead.tolist(), strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hugging_face_probes_in_low_precision(kind, dtype):
    """A bf16/fp16 model: the probes agree with the float64 reference to the model's own rounding."""
    build, reference = MODELS[kind]
    model = build("eager")
    idx, mask = _inputs()
    out, heads, layers = _measure(model, idx, mask, dtype)
    refs = reference(model, out.hidden_states, mask)  # the low-precision weights and inputs, in float64
    for i, z in enumerate(refs):
        top, per_head = ref_stats(z.numpy())
        assert math.isfinite(layers[i]) and layers[i] == pytest.approx(top, rel=3e-2, abs=3e-2)
        got = [v for name, v in heads.items() if f".{i}." in name]
        assert got == pytest.approx(per_head.tolist(), rel=5e-2, abs=2e-2)
