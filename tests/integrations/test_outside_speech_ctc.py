"""KeelCallback on transformers' run_speech_recognition_ctc.py recipe, as a user runs it: a ``Wav2Vec2ForCTC`` built
from a tiny config (feature encoder frozen), its ``DataCollatorCTCWithPadding`` (audio padded with an attention mask,
labels padded with -100) and the Trainer, fp32 on CPU; the audio is generated noise (nothing is downloaded).

With ``ctc_zero_infinity=False`` (the config's default) a label sequence longer than the frames the model outputs for
its audio has no alignment and its CTC loss is inf — a classic real failure: the bare Trainer's weights all turn NaN
and its log reads ``loss 0.0`` from then on. keel skips that update and says what an inf CTC loss means (h25 C1)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments, Wav2Vec2Config, Wav2Vec2ForCTC  # noqa: E402

from keel._core.decision import Decision  # noqa: E402
from keel._core.finding import Finding  # noqa: E402
from keel.integrations.hf import KeelCallback, _impossible_alignment  # noqa: E402

VOCAB, BATCH, STEPS = 16, 2, 4


def _clip(g: torch.Generator, samples: int, labels: int) -> dict[str, torch.Tensor]:
    return {
        "input_values": torch.randn(samples, generator=g) * 0.1,
        "labels": torch.randint(1, VOCAB, (labels,), generator=g),
    }


def _data(impossible: bool) -> list[dict[str, torch.Tensor]]:
    """STEPS batches of clips; with ``impossible`` the last clip has 60 labels over its ~30 frames (stride 10)."""
    g = torch.Generator().manual_seed(1)
    data = [_clip(g, 400, 6) for _ in range(BATCH * STEPS)]
    if impossible:
        data[-1] = _clip(g, 300, 60)
    return data


def _collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """DataCollatorCTCWithPadding: pad the audio (attention mask) and the labels, padding → -100."""
    width = max(len(f["input_values"]) for f in features)
    labels = max(len(f["labels"]) for f in features)
    batch = {
        "input_values": torch.zeros(len(features), width),
        "attention_mask": torch.zeros(len(features), width, dtype=torch.long),
        "labels": torch.full((len(features), labels), -100),
    }
    for row, f in enumerate(features):
        batch["input_values"][row, : len(f["input_values"])] = f["input_values"]
        batch["attention_mask"][row, : len(f["input_values"])] = 1
        batch["labels"][row, : len(f["labels"])] = f["labels"]
    return batch


def _train(tmp_path: Path, callbacks: list, *, impossible: bool, zero_infinity: bool = False) -> Trainer:
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        conv_dim=(8, 8),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
        pad_token_id=0,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=zero_infinity,
        mask_time_prob=0.0,
    )
    model = Wav2Vec2ForCTC(config)
    model.freeze_feature_encoder()
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=3e-4,
        warmup_steps=1,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_data(impossible), data_collator=_collate, callbacks=callbacks
    )
    trainer.train()
    return trainer


def test_an_impossible_alignment_is_skipped_and_named_for_what_it_is(tmp_path, caplog):
    callback = KeelCallback(policy="skip")
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer = _train(tmp_path, [callback], impossible=True)
    assert callback.guard is not None
    skipped = [d for d in callback.guard.decisions if d.action == "skip"]
    assert len(skipped) == 1 and "inf" in skipped[0].reason
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # bare: every weight NaN
    told = [r.getMessage() for r in caplog.records if "CTC loss is inf" in r.getMessage()]
    assert len(told) == 1 and "ctc_zero_infinity" in told[0]  # was: only "lower the learning rate … prefer bf16"


def test_with_ctc_zero_infinity_the_same_data_trains_with_no_skip_and_no_hint(tmp_path, caplog):
    callback = KeelCallback(policy="skip")
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer = _train(tmp_path, [callback], impossible=True, zero_infinity=True)
    assert callback.guard is not None and not callback.guard.decisions
    assert not any("CTC" in r.getMessage() for r in caplog.records)
    assert trainer.state.global_step == STEPS


@pytest.mark.slow  # two Trainer runs
def test_observe_is_bit_identical_to_the_trainer_alone(tmp_path):
    bare = _train(tmp_path / "bare", [], impossible=False)
    observed = _train(tmp_path / "observed", [KeelCallback(policy="observe")], impossible=False)
    assert all(torch.equal(a, b) for a, b in zip(bare.model.parameters(), observed.model.parameters(), strict=True))


class _Config:
    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)


class _Model:
    def __init__(self, config) -> None:
        self.config = config


def _decision(*findings: Finding) -> Decision:
    return Decision(step=3, action="skip", findings=findings)


INF_LOSS = Finding(step=3, kind="non_finite", severity="critical", signal="loss", value=math.inf)


@pytest.mark.parametrize(
    ("model", "decision", "hint"),
    [
        (_Model(_Config(ctc_zero_infinity=False)), _decision(INF_LOSS), True),
        (_Model(_Config(ctc_zero_infinity=True)), _decision(INF_LOSS), False),  # the model zeroes them itself
        (_Model(_Config()), _decision(INF_LOSS), False),  # not a CTC model
        (_Model(_Config(ctc_zero_infinity=None)), _decision(INF_LOSS), False),
        (_Model(None), _decision(INF_LOSS), False),  # no config at all
        (None, _decision(INF_LOSS), False),
        (_Model(_Config(ctc_zero_infinity=False)), _decision(), False),  # nothing found
        (_Model(_Config(ctc_zero_infinity=False)), _decision(replace(INF_LOSS, value=math.nan)), False),  # NaN: no
        (_Model(_Config(ctc_zero_infinity=False)), _decision(replace(INF_LOSS, value=-math.inf)), False),
        (_Model(_Config(ctc_zero_infinity=False)), _decision(replace(INF_LOSS, signal="grad/norm")), False),
    ],
)
def test_the_hint_is_for_an_inf_loss_of_a_ctc_model_that_does_not_zero_it(model, decision, hint):
    said = _impossible_alignment({"model": model}, decision)
    assert (said is not None) == hint
    if hint:
        assert said.startswith("step 3: the CTC loss is inf") and "--ctc_zero_infinity" in said
