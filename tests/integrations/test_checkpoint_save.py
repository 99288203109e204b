"""A guarded Trainer saves its checkpoints: keel's gate on the LR scheduler's ``step`` (`keel.integrations._handoff`)
lives in the scheduler's ``__dict__``, which torch's ``LRScheduler.state_dict`` returns whole — the Trainer's
``torch.save`` of it raised ``PicklingError`` at the first checkpoint (``save_strategy="steps"``, the Trainer's
default), killing TRL's own ``trl/scripts/dpo.py`` under ``guard_trainer``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from keel.integrations.hf import KeelCallback  # noqa: E402


def saved_scheduler(folder) -> dict:
    """The checkpoint's scheduler state, read as plain data (``weights_only``: no code in it)."""
    return torch.load(folder / "scheduler.pt", weights_only=True)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("policy", ["observe", "skip"])
def test_a_trainer_under_keel_saves_a_checkpoint_whose_scheduler_state_is_plain_data(tmp_path, policy):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    data = [{"input_ids": x, "labels": x} for x in ids]
    callback = KeelCallback(run_dir=str(tmp_path / "keel"), policy=policy)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    state = saved_scheduler(tmp_path / "out" / "checkpoint-2")
    assert state["last_epoch"] == 2 and not any(callable(v) for v in state.values())


@pytest.mark.slow  # ~4 s with TRL's import; the Trainer tests above back the same gate by default
@pytest.mark.usefixtures("one_torch_thread")
def test_a_guarded_trl_dpo_trainer_saves_its_checkpoint(tmp_path):
    pytest.importorskip("trl")
    from keel.integrations.trl import guard_trainer
    from tests.integrations import _trl_tiny as tiny

    trainer = tiny.dpo_trainer(tmp_path / "out", steps=2, save_strategy="steps", save_steps=2)
    guard_trainer(trainer, run_dir=str(tmp_path / "keel"), policy="skip")
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file() and "step" not in saved_scheduler(checkpoint)
