"""Small offline trainers for `keel bench integrations`: a transformers Llama built from a config (nothing
downloaded), trained on keel's proxy corpus (bytes of the Python standard library's source) by the Hugging Face
``Trainer`` or by a Lightning ``Trainer`` around a ``LightningModule`` — each as its user writes it, with keel's
callback or without it. The same weights, batches and seeds every call, so two blocks train alike.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from keel.proxy import ProxyBatches

FRAMEWORKS = ("hf", "lightning")


@dataclass(kw_only=True, frozen=True)
class TinyRun:
    """The model and data of a benchmark trainer.

    Attributes:
        hidden_size: The Llama's width (2 layers, 4 heads over 2 KV heads, MLP 2x wide, byte vocabulary).
        batch_size: Sequences per step.
        seq_len: Bytes per sequence.
        steps: Optimizer steps the trainer runs.
    """

    hidden_size: int
    batch_size: int
    seq_len: int
    steps: int


def tiny_llama(run: TinyRun) -> LlamaForCausalLM:
    """The run's causal LM, seeded: two calls build the same weights."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=run.hidden_size,
        intermediate_size=2 * run.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=run.seq_len,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config)


class ByteSequences(torch.utils.data.Dataset):
    """``batch_size * steps`` windows of the proxy corpus as ``{"input_ids", "labels"}`` (the model shifts them)."""

    def __init__(self, run: TinyRun) -> None:
        batches = ProxyBatches(batch_size=run.batch_size, seq_len=run.seq_len, seed=0)
        self.rows = torch.cat([batches.next()[0] for _ in range(run.steps)])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class StepMarks:
    """When each optimizer step begins: ``begins`` (``time.perf_counter()``) and ``cpu`` (``time.process_time()``,
    all the process's threads)."""

    def __init__(self) -> None:
        self.begins: list[float] = []
        self.cpu: list[float] = []

    def mark(self) -> None:
        self.cpu.append(time.process_time())
        self.begins.append(time.perf_counter())


class HfStepTimer(TrainerCallback):
    """`StepMarks` at the HF ``Trainer``'s ``on_step_begin``."""

    def __init__(self, marks: StepMarks) -> None:
        self.marks = marks

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.marks.mark()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Without the frameworks' banners, tips and warnings on stdout/stderr, where the benchmark's output is."""
    with contextlib.suppress(ImportError):  # its loggers exist once it is imported; an hf-only run may lack it
        import lightning  # noqa: F401

    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("lightning", "transformers")]
    loggers = [logging.getLogger(name) for name in names]  # each: Lightning sets its own levels to INFO
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def train_hf(run: TinyRun, out: Path, callbacks: list[Any], marks: StepMarks) -> None:
    """``run.steps`` steps of the Hugging Face ``Trainer`` (AdamW, lr 1e-3, fp32, CPU, no checkpoints, a log line
    every 10 steps) with ``callbacks``."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=run.steps,
        per_device_train_batch_size=run.batch_size,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=tiny_llama(run),
        args=args,
        train_dataset=ByteSequences(run),
        callbacks=[HfStepTimer(marks), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def train_lightning(run: TinyRun, out: Path, callbacks: list[Any], marks: StepMarks) -> None:
    """``run.steps`` steps of a Lightning ``Trainer`` (CPU, fp32, no logger, checkpoint or progress bar) on a
    ``LightningModule`` around the same model (AdamW, lr 1e-3) with ``callbacks``."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama(run)

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Timer(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            marks.mark()

    loader = torch.utils.data.DataLoader(ByteSequences(run), batch_size=run.batch_size, shuffle=False)
    trainer = L.Trainer(
        max_steps=run.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[Timer(), *callbacks],
    )
    trainer.fit(Module(), loader)
