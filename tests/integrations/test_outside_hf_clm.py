"""KeelCallback on transformers' run_clm.py recipe, as a user runs it: a causal LM trained on text grouped into
blocks, with gradient accumulation, clipping, a warmed-up cosine-with-restarts schedule and the Trainer's own logs.
The model is a tiny GPT-2 built from a config and the text is Python's own source, read as bytes (nothing is
downloaded). keel must leave what the Trainer logs as it is: the log is what users plot and compare runs by."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from keel.integrations.hf import KeelCallback  # noqa: E402

STEPS, BLOCK = 6, 32


def _blocks(count: int) -> list[list[int]]:
    """run_clm's group_texts on the bytes of a stdlib module: consecutive blocks of BLOCK tokens."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_bytes()
    return [list(text[i * BLOCK : (i + 1) * BLOCK]) for i in range(count)]


class LearningRates(TrainerCallback):
    """The learning rate each update is made with (read just before the optimizer step)."""

    def __init__(self) -> None:
        self.used: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.used.append(optimizer.param_groups[0]["lr"])


def _run_clm(tmp_path: Path, callbacks: list) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2))
    data = [{"input_ids": b, "labels": b} for b in map(torch.tensor, _blocks(64))]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="cosine_with_restarts",
        warmup_steps=2,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return trainer


def _logged(trainer: Trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def test_observe_leaves_the_trainers_log_and_weights_as_they_are(tmp_path):
    bare = _run_clm(tmp_path / "bare", [])
    observed = _run_clm(tmp_path / "observed", [KeelCallback(policy="observe")])
    for key in ("loss", "grad_norm", "learning_rate"):
        assert _logged(observed, key) == _logged(bare, key), key  # learning_rate: was the next update's
    assert all(torch.equal(a, b) for a, b in zip(bare.model.parameters(), observed.model.parameters(), strict=True))


@pytest.mark.parametrize("policy", ["observe", "skip"])
def test_the_logged_learning_rate_is_the_one_the_update_was_made_with(tmp_path, policy):
    rates = LearningRates()
    trainer = _run_clm(tmp_path, [rates, KeelCallback(policy=policy)])
    assert len(rates.used) == STEPS
    assert _logged(trainer, "learning_rate") == rates.used  # as the bare Trainer logs it
