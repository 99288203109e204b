"""KeelCallback on transformers' run_translation.py / run_summarization.py recipe, as a user runs it: a T5 built from
a tiny config, ``Seq2SeqTrainer`` with ``DataCollatorForSeq2Seq`` (labels padded with -100) and
``--label_smoothing_factor 0.1``. With label smoothing the Trainer pops the labels and computes the loss itself
(``LabelSmoother``), so the model's output carries no loss; keel watched the gradients only and warned (h25 C2). It
now takes the loss the Trainer backpropagates. Text: Python's own source, as bytes (nothing is downloaded)."""

from __future__ import annotations

import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
)

from keel import KeelWarning  # noqa: E402
from keel.integrations.hf import KeelCallback  # noqa: E402
from keel.store import RunReader  # noqa: E402

STEPS, PAD, EOS = 4, 0, 1


class ByteTokenizer:
    """The part of a tokenizer ``DataCollatorForSeq2Seq`` uses: ``pad`` (inputs only; it pads the labels)."""

    pad_token_id, padding_side = PAD, "right"

    def pad(self, features, return_tensors="pt", **kwargs):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), PAD)
        for row, f in enumerate(features):
            ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        batch = {"input_ids": ids, "attention_mask": (ids != PAD).long()}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch


def _pairs(count: int) -> list[dict[str, list[int]]]:
    """Source lines of a stdlib module and their reversal (the 'translation'), as bytes + 2, EOS-terminated."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_bytes()
    lines = [line for line in text.split(b"\n") if 10 < len(line) < 40][:count]
    return [
        {"input_ids": [b + 2 for b in line] + [EOS], "labels": [b + 2 for b in line[::-1][:12]] + [EOS]}
        for line in lines
    ]


def _train(tmp_path: Path, callbacks: list, *, label_smoothing: float) -> Seq2SeqTrainer:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=258,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    model = T5ForConditionalGeneration(config)
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        warmup_steps=1,
        max_grad_norm=1.0,
        label_smoothing_factor=label_smoothing,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(ByteTokenizer(), model=model, label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=_pairs(64), data_collator=collator, callbacks=callbacks
    )
    trainer.train()
    return trainer


def _logged_losses(trainer: Seq2SeqTrainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def test_with_label_smoothing_keel_records_the_loss_the_trainer_logs(tmp_path):
    callback = KeelCallback(run_dir=str(tmp_path / "keel"), policy="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)  # was: "KeelCallback saw no loss in the model's output"
        trainer = _train(tmp_path, [callback], label_smoothing=0.1)
    with RunReader(tmp_path / "keel") as run:
        steps, losses = run.signal("loss")
    assert len(steps) == STEPS
    assert list(losses) == pytest.approx(_logged_losses(trainer), abs=1e-4)  # the Trainer logs 4 decimals


@pytest.mark.slow  # two Trainer runs: ~3.5 s on a loaded 2-core machine
def test_observe_with_label_smoothing_is_bit_identical_to_the_trainer_alone(tmp_path):
    bare = _train(tmp_path / "bare", [], label_smoothing=0.1)
    observed = _train(tmp_path / "observed", [KeelCallback(policy="observe")], label_smoothing=0.1)
    assert _logged_losses(observed) == _logged_losses(bare)
    assert all(torch.equal(a, b) for a, b in zip(bare.model.parameters(), observed.model.parameters(), strict=True))
