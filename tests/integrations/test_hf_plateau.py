"""KeelCallback with the Trainer's lr_scheduler_type="reduce_lr_on_plateau": the Trainer steps it with the evaluation's
metric; keel must neither step it per update (TypeError: no metric) nor swallow the Trainer's call."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from keel.integrations.hf import KeelCallback  # noqa: E402


def _train(tmp_path, callbacks):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    )
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs={"patience": 0, "factor": 0.5, "threshold": 10.0},  # every evaluation is "no better"
        eval_strategy="steps",
        eval_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=callbacks
    )
    trainer.train()
    return trainer.optimizer.param_groups[0]["lr"], [p.detach().clone() for p in trainer.model.parameters()]


def test_a_plateau_scheduler_is_stepped_by_the_trainer_with_its_metric_under_keel(tmp_path):
    bare_lr, bare = _train(tmp_path / "bare", [])
    lr, params = _train(tmp_path / "keel", [KeelCallback(policy="observe", run_dir=str(tmp_path / "run"))])
    assert bare_lr < 3e-3  # the Trainer's evaluations brought the LR down
    assert lr == bare_lr  # was a ValueError at on_train_begin (a TypeError at the first update before that)
    assert all(torch.equal(a, b) for a, b in zip(bare, params, strict=True))  # observe: bit-identical
