"""Tiny, offline TRL trainers for the tests: a character-level tokenizer, a Qwen2 built from a config, and the
``DPOTrainer``, ``GRPOTrainer`` and ``RewardTrainer`` recipes of reference/rl-anchors.md §2 (nothing downloaded).

TRL turns on bf16 and gradient checkpointing by default, even on CPU; both are off here (a step takes ~0.02 s).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

from keel.harness.bench._trl_tiny import common_args  # one recipe for the tests and keel bench trl

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,=+"
PAIRS = [  # (prompt, chosen, rejected): the chosen answer is the right sum
    (f"{a}+{b}=", f"{a + b}.", f"{a + b + 1}.")
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (9, 9)]
]


def char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character (WordLevel over single characters), with pad, eos and unk."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _config(tok: PreTrainedTokenizerFast, **extra: Any) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **extra,
    )


def causal_lm(tok: PreTrainedTokenizerFast, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(_config(tok))


def reward_model(tok: PreTrainedTokenizerFast, seed: int = 0) -> Qwen2ForSequenceClassification:
    torch.manual_seed(seed)
    return Qwen2ForSequenceClassification(_config(tok, num_labels=1))


def preference_data(n: int = 16) -> Dataset:
    rows = [PAIRS[i % len(PAIRS)] for i in range(n)]
    return Dataset.from_dict({k: [r[i] for r in rows] for i, k in enumerate(("prompt", "chosen", "rejected"))})


def dpo_trainer(out: Path, steps: int = 3, callbacks: list | None = None, **config: Any) -> DPOTrainer:
    tok = char_tokenizer()
    model = causal_lm(tok)
    args = DPOConfig(**common_args(out, steps, **{"per_device_train_batch_size": 2, **config}))
    return DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=preference_data(),
        processing_class=tok,
        callbacks=callbacks,
    )


def digit_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """The fraction of a completion's characters that are digits: dense, so a group's rewards differ and the
    advantages (and the GRPO loss) are not all zero on an untrained model."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def grpo_trainer(
    out: Path,
    steps: int = 3,
    callbacks: list | None = None,
    reward: Any = digit_reward,
    model: Any = None,
    **config: Any,
) -> GRPOTrainer:
    """GRPO with β=0 on the tiny model; pass ``model`` (a saved folder's path) for β>0 (GRPO has no ref_model)."""
    tok = char_tokenizer()
    settings = {"per_device_train_batch_size": 3, "num_generations": 3, "max_completion_length": 8, **config}
    prompts = Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS] * 2})
    return GRPOTrainer(
        model=causal_lm(tok) if model is None else model,
        reward_funcs=reward,
        args=GRPOConfig(**common_args(out, steps, **settings)),
        train_dataset=prompts,
        processing_class=tok,
        callbacks=callbacks,
    )


def saved_model(folder: Path) -> str:
    """The tiny causal LM and its tokenizer saved in ``folder`` (for GRPO with β>0, which reloads a reference)."""
    tok = char_tokenizer()
    causal_lm(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def reward_trainer(out: Path, steps: int = 3, callbacks: list | None = None, **config: Any) -> RewardTrainer:
    tok = char_tokenizer()
    pairs = preference_data()
    data = Dataset.from_dict(
        {
            "chosen": [p + c for p, c in zip(pairs["prompt"], pairs["chosen"], strict=True)],
            "rejected": [p + r for p, r in zip(pairs["prompt"], pairs["rejected"], strict=True)],
        }
    )
    args = RewardConfig(
        **common_args(out, steps, **{"per_device_train_batch_size": 2, "learning_rate": 0.01, **config})
    )
    return RewardTrainer(
        model=reward_model(tok), args=args, train_dataset=data, processing_class=tok, callbacks=callbacks
    )


def params(trainer: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]
