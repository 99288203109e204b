"""The router probe on Hugging Face MoE families built from tiny configs (no weights): Mixtral, Qwen2-MoE (shared
expert), Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3 (sigmoid scores, bias correction, grouped top-k), GPT-OSS
(router bias), and the encoder-decoder Switch Transformers and NLLB-MoE, whose routers keep the logits in a
``classifier`` child and return a dispatch mask first (the ``*TopKRouter`` layout rule misses them). Every router
must be found (nothing else: no shared-expert gate, no dense layer), with its top-k, and every signal must equal a
float64 recomputation from the model's own ``output_router_logits``, with the experts chosen by the model's own
rule."""

from __future__ import annotations

import math

import pytest
import torch

from keel._core import keys
from keel.signals import RouterProbe

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _switch() -> torch.nn.Module:
    config = transformers.SwitchTransformersConfig(
        vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4,
        expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1, router_jitter_noise=0.0,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.SwitchTransformersForConditionalGeneration(config)


def _nllb_moe() -> torch.nn.Module:
    config = transformers.NllbMoeConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4, expert_capacity=64, encoder_sparse_step=1,
        decoder_sparse_step=1, max_position_embeddings=64, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.NllbMoeForConditionalGeneration(config)


COMMON = {
    "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 64,
}  # fmt: skip
MLA = {
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "head_dim": 8,
}


def _decoder(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(**COMMON, num_local_experts=4))
    if family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
        )
        return transformers.Qwen2MoeForCausalLM(config)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8
        )
        return transformers.Qwen3MoeForCausalLM(config)
    if family == "olmoe":
        config = transformers.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, eos_token_id=0)
        return transformers.OlmoeForCausalLM(config)
    if family == "deepseek_v2":
        config = transformers.DeepseekV2Config(
            **{**COMMON, "num_key_value_heads": 4}, **MLA, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, moe_intermediate_size=32,
        )  # fmt: skip
        return transformers.DeepseekV2ForCausalLM(config)
    if family == "deepseek_v3":  # layer 0 dense; 8 experts in 2 groups, 1 group kept, a non-zero correction bias
        config = transformers.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, **MLA, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
            topk_group=1, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=32,
        )  # fmt: skip
        model = transformers.DeepseekV3ForCausalLM(config)
        bias = model.model.layers[1].mlp.gate.e_score_correction_bias
        bias.copy_(torch.linspace(-0.3, 0.3, bias.numel()))
        return model
    assert family == "gpt_oss"
    config = transformers.GptOssConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    return transformers.GptOssForCausalLM(config)


def _chosen(router: torch.nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The experts the model's own rule picks, in float64: the top k of the logits, or DeepSeek-V3's sigmoid score
    plus correction bias within the top ``topk_group`` groups (a group scored by its two best experts)."""
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None:
        return x.topk(k, -1).indices
    score = x.sigmoid() + bias.double()
    n_tokens, n_experts = score.shape
    groups = score.view(n_tokens, router.num_group, -1)
    kept = groups.topk(2, -1).values.sum(-1).topk(router.topk_group, -1).indices
    mask = torch.zeros(n_tokens, router.num_group, dtype=torch.bool).scatter_(1, kept, True)
    mask = mask.unsqueeze(-1).expand_as(groups).reshape(n_tokens, n_experts)
    return score.masked_fill(~mask, -math.inf).topk(k, -1).indices


def _reference(logits: torch.Tensor, k: int, router: torch.nn.Module | None = None) -> dict[str, float]:
    x = logits.detach().reshape(-1, logits.shape[-1]).double()
    n_tokens, n_experts = x.shape
    counts = torch.bincount(_chosen(router, x, k).flatten(), minlength=n_experts).double()
    p = x.softmax(-1)
    return {
        "max_logit": x.max().item(),
        "z": torch.logsumexp(x, -1).square().mean().item(),
        "entropy": (torch.special.entr(p).sum(-1) / math.log(n_experts)).mean().item(),
        "imbalance": (counts.max() / counts.mean()).item(),
        "dead": float((counts == 0).sum()),
        "cv": (counts.std(correction=0) / counts.mean()).item(),
        "aux": (n_experts * (counts / (n_tokens * k) * p.mean(0)).sum()).item(),
    }


PER_LAYER = {
    "max_logit": keys.MOE_ROUTER_MAX_LOGIT_PER_LAYER,
    "z": keys.MOE_ROUTER_Z_PER_LAYER,
    "entropy": keys.MOE_GATE_ENTROPY_PER_LAYER,
    "imbalance": keys.MOE_LOAD_IMBALANCE_PER_LAYER,
    "dead": keys.MOE_DEAD_EXPERTS_PER_LAYER,
    "cv": keys.MOE_LOAD_CV_PER_LAYER,
}


def _check(got: dict, logits: list[torch.Tensor], refs: list[dict[str, float]], routers: list[str]) -> None:
    assert len(logits) == len(routers)
    for signal, key in PER_LAYER.items():
        names, values = got[key]
        assert list(names) == routers
        expected = torch.tensor([r[signal] for r in refs], dtype=torch.float32)
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)
    assert got[keys.MOE_AUX_LOSS].item() == pytest.approx(sum(r["aux"] for r in refs) / len(refs), rel=1e-5)


@pytest.mark.parametrize(
    ("family", "layers", "experts"),
    [
        ("mixtral", (0, 1), 4),
        ("qwen2_moe", (0, 1), 4),  # shared_expert_gate (1, d) is not a router
        ("qwen3_moe", (0, 1), 4),
        ("olmoe", (0, 1), 4),
        ("deepseek_v2", (0, 1), 4),
        ("deepseek_v3", (1,), 8),  # layer 0 is dense (first_k_dense_replace=1)
        ("gpt_oss", (0, 1), 4),
    ],
)
def test_decoder_families_every_router_found_and_measured_against_its_own_logits(family, layers, experts):
    model = _decoder(family)
    model.train()
    probe = RouterProbe()
    probe.attach(model)
    leaf = "router" if family == "gpt_oss" else "gate"
    routers = [f"model.layers.{i}.mlp.{leaf}" for i in layers]
    assert [(s.name, s.top_k) for s in probe.sites] == [(name, 2) for name in routers]
    ids = torch.randint(3, 99, (4, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    got = probe.read()
    refs = [_reference(x, 2, site.module) for x, site in zip(out.router_logits, probe.sites, strict=True)]
    _check(got, list(out.router_logits), refs, routers)
    assert (got[keys.MOE_EXPERTS].item(), got[keys.MOE_TOP_K].item()) == (experts, 2)
    if not family.startswith("deepseek"):  # HF's aux loss (none for DeepSeek) pools the layers: k at balance
        assert out.aux_loss.item() / 2 == pytest.approx(got[keys.MOE_AUX_LOSS].item(), abs=0.02)


@pytest.mark.parametrize(
    ("build", "k", "routers"),
    [
        (_switch, 1, [f"{p}.block.{i}.layer.{j}.mlp.router.classifier" for p, j in (("encoder", 1), ("decoder", 2)) for i in (0, 1)]),  # noqa: E501
        (_nllb_moe, 2, [f"model.{p}.layers.{i}.ffn.router.classifier" for p in ("encoder", "decoder") for i in (0, 1)]),
    ],
    ids=["switch", "nllb_moe"],
)  # fmt: skip
def test_every_encoder_and_decoder_router_is_found_and_measured_against_its_own_logits(build, k, routers):
    model = build()
    model.train()
    probe = RouterProbe()
    probe.attach(model)
    assert [(s.name, s.top_k) for s in probe.sites] == [(name, k) for name in routers]
    g = torch.Generator().manual_seed(0)
    out = model(
        input_ids=torch.randint(3, 99, (4, 12), generator=g),
        labels=torch.randint(3, 99, (4, 12), generator=g),
        output_router_logits=True,
    )
    got = probe.read()
    logits = [*out.encoder_router_logits, *out.decoder_router_logits]
    _check(got, logits, [_reference(x, k) for x in logits], routers)
    assert (got[keys.MOE_EXPERTS].item(), got[keys.MOE_TOP_K].item()) == (4, k)


def test_naming_a_router_that_returns_a_dispatch_mask_first_is_a_clear_keel_error():
    model = _switch()
    model.train()
    probe = RouterProbe(modules=["encoder.block.0.layer.1.mlp.router"], top_k=1)
    probe.attach(model)
    model(input_ids=torch.ones(1, 4, dtype=torch.long), decoder_input_ids=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"integer tensor.*logits"):
        probe.read()
