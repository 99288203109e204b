"""Tiny Hugging Face models built from a config (no weights downloaded), shared by the tests that need one."""

from __future__ import annotations

from torch import nn


def tiny_llama() -> nn.Module:
    """A 2-layer Llama, 32 wide, 4 heads over 2 KV heads, vocabulary 64: a transformers model in milliseconds."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_mixtral(layers: int = 2) -> nn.Module:
    """A Mixtral of ``layers`` layers, 32 wide, 4 experts top-2, eager experts (the grouped kernel needs widths the
    CPU refuses), vocabulary 99; seeded, so two calls build the same model."""
    import torch
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        experts_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)
