"""A tiny Qwen2 causal LM and a character-level tokenizer, built from a config: nothing is downloaded."""

from __future__ import annotations

import string

import torch

CHARACTERS = string.ascii_lowercase + string.digits + " .,?!"


def tiny_tokenizer():
    """WordLevel over single characters (pad 0, eos 1, unk 2, then 41 characters), split per character."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_qwen2(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Qwen2ForCausalLM with hidden 16, intermediate 32, 2 layers, 4 heads, 2 KV heads, 128 positions."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(dtype)
