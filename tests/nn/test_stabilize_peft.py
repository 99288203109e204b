"""keel.stabilize on peft LoRA models: Hugging Face Llama and GPT-2 from tiny configs wrapped by get_peft_model."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from keel.nn import stabilize
from keel.nn.stabilize import DEFAULT_STABILIZERS

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from tests.tiny_hf import tiny_llama  # noqa: E402


def _llama(targets=("q_proj", "v_proj")):
    torch.manual_seed(0)
    model = tiny_llama()
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft: "fan_in_fan_out is set to False ... Conv1D"
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("build", "attention"),
    [
        (_llama, "base_model.model.model.layers.{}.self_attn"),
        # slow: the fast check of the fused path is the matching test below
        pytest.param(
            lambda: _llama(targets=("q_proj", "k_proj")),
            "base_model.model.model.layers.{}.self_attn",
            marks=pytest.mark.slow,
        ),
        pytest.param(_gpt2, "base_model.model.transformer.h.{}.attn", marks=pytest.mark.slow),
    ],
    ids=["llama-q-v", "llama-q-k", "gpt2-c_attn"],
)
def test_default_stabilizers_find_the_attention_behind_lora_wrapped_projections_and_training_goes_on(build, attention):
    model = build().eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "matched nothing" would be a warning
        result = stabilize(model, list(DEFAULT_STABILIZERS), optimizer=opt)
    assert result.by_stabilizer()["qk_norm"] == [attention.format(i) for i in range(2)]
    assert result.by_stabilizer()["z_loss"] == ["base_model.model.lm_head"]
    model.train()
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + result.z_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())
    adapters = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in adapters)  # the adapters learn under QK-norm


def test_qk_norm_finds_a_lora_wrapped_fused_projection_and_normalises_its_output():
    model = _gpt2().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = stabilize(model, ["qk_norm"])
    assert result.by_stabilizer()["qk_norm"] == [f"base_model.model.transformer.h.{i}.attn" for i in range(2)]
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn
    q = c_attn(torch.randn(1, 3, 32))[..., :32].unflatten(-1, (2, 16))  # the hooked wrapper's output: q per head
    torch.testing.assert_close(q.mean(-1), torch.zeros(1, 3, 2), atol=1e-5, rtol=0)  # LayerNorm'd per head


def test_sigma_reparam_leaves_the_frozen_base_and_the_adapters_alone():
    model = _llama()
    before = _trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matched nothing: every dense weight is frozen or an adapter factor
        result = stabilize(model, ["sigma_reparam"], optimizer=opt)
    assert result.by_stabilizer().get("sigma_reparam", []) == []
    assert _trainable(model) == before  # no trainable γ slipped into the frozen base, the adapters keep B·A
    model.base_model.model.lm_head.weight.requires_grad_(True)  # a trained head is reparametrised as before
    result = stabilize(model, ["sigma_reparam"], optimizer=opt)
    assert result.by_stabilizer()["sigma_reparam"] == ["base_model.model.lm_head"]
