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
