"""Small offline TRL trainers for `keel bench trl`: a character tokenizer, a Qwen2 built from a config (nothing
downloaded) and the ``DPOTrainer`` / ``GRPOTrainer`` recipes of reference/rl-anchors.md §2, on real text.

The text is keel's proxy corpus (the Python standard library's source): a prompt is the start of a line, the
chosen answer how that line goes on, the rejected one how the next line goes on; GRPO completes the prompts.
TRL turns on bf16 and gradient checkpointing by default, even on a CPU; both are off here.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, PrinterCallback, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

from keel.proxy.corpus import load_corpus

PAIRS = 256  # preference pairs / prompts (every variant meets the same batches and epoch boundaries)


def common_args(out: Path, steps: int, **overrides: Any) -> dict[str, Any]:
    """TrainingArguments every tiny trainer shares (here and in the tests): CPU, fp32, no checkpointing, a log line
    every step; ``overrides`` replace any of them."""
    return {
        "output_dir": str(out),
        "max_steps": steps,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
        "learning_rate": 0.05,
        **overrides,
    }


@dataclass(kw_only=True, frozen=True)
class TinyModel:
    """The model and batch of a benchmark trainer.

    Attributes:
        hidden_size: Qwen2's width (2 layers, 4 heads, MLP 2× wide).
        batch_size: DPO pairs per step; GRPO completions per step (``num_generations`` = 2 per prompt).
        text_chars: Characters (= tokens) of a prompt and of an answer / completion.
    """

    hidden_size: int
    batch_size: int
    text_chars: int


class StepTimer(TrainerCallback):
    """Notes when each optimizer step begins: ``begins`` (``time.perf_counter()``) and ``cpu``
    (``time.process_time()``, the CPU time of all the process's threads)."""

    def __init__(self) -> None:
        self.begins: list[float] = []
        self.cpu: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.cpu.append(time.process_time())
        self.begins.append(time.perf_counter())


def corpus_pairs(n: int, chars: int) -> dict[str, list[str]]:
    """``n`` (prompt, chosen, rejected) triples of ``chars`` characters each, cut from printable corpus lines."""
    text = bytes(load_corpus(max_bytes=400_000)).decode("ascii", errors="ignore")
    lines = [line.strip()[: 2 * chars] for line in text.splitlines()]
    lines = [line for line in lines if len(line) == 2 * chars and line.isprintable()][:n]
    return {
        "prompt": [line[:chars] for line in lines],
        "chosen": [line[chars:] for line in lines],
        "rejected": [lines[(i + 1) % len(lines)][chars:] for i in range(len(lines))],
    }


def char_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """One token per character seen in ``texts``, plus pad, eos and unk."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(sorted(set("".join(texts))))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def letter_reward(completions: list[str], **kwargs: Any) -> list[float | None]:
    """The share of a completion's characters that are letters: dense, so a group's rewards differ."""
    return [sum(c.isalpha() for c in text) / max(len(text), 1) for text in completions]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Without the datasets library's progress bars and transformers' deprecation warnings (about TRL's own
    arguments) on stderr, where the benchmark's progress bar is; restored afterwards."""
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()


def build_trainer(
    kind: str, model: TinyModel, steps: int, out: Path, callbacks: list[TrainerCallback]
) -> DPOTrainer | GRPOTrainer:
    """A fresh ``kind`` ("dpo" or "grpo") trainer of ``steps`` optimizer steps; the same weights, data and seeds
    every call, so two calls train alike. Its log goes nowhere (no printed dicts between the timed steps)."""
    pairs = corpus_pairs(PAIRS, model.text_chars)
    tok = char_tokenizer(pairs["prompt"] + pairs["chosen"] + pairs["rejected"])
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=model.hidden_size,
            intermediate_size=2 * model.hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4 * model.text_chars,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
    )
    common = common_args(out, steps, logging_steps=10, learning_rate=1e-3)
    trainer: DPOTrainer | GRPOTrainer
    if kind == "dpo":
        trainer = DPOTrainer(
            model=policy,
            ref_model=copy.deepcopy(policy),
            args=DPOConfig(**common, per_device_train_batch_size=model.batch_size),
            train_dataset=Dataset.from_dict(pairs),
            processing_class=tok,
            callbacks=callbacks,
        )
    elif kind == "grpo":
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=letter_reward,
            args=GRPOConfig(
                **common,
                per_device_train_batch_size=model.batch_size,
                num_generations=2,
                max_completion_length=model.text_chars,
            ),
            train_dataset=Dataset.from_dict({"prompt": pairs["prompt"]}),
            processing_class=tok,
            callbacks=callbacks,
        )
    else:
        raise ValueError(f"trainer kind {kind!r}; allowed: dpo, grpo")
    trainer.remove_callback(PrinterCallback)
    return trainer
