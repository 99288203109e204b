"""guard_trainer on TRL's SFTTrainer (`trl sft`, the most used TRL recipe): keel must see the loss SFTTrainer
optimises, which is not the model's output loss — SFTTrainer 1.16 computes it from the fused head's per-token
log-probabilities, normalised over the step's tokens, and with ``loss_type="dft"`` it is another objective."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from keel.harness.bench._trl_tiny import common_args  # noqa: E402
from keel.integrations.trl import META_KEY, guard_trainer  # noqa: E402
from keel.store import RunReader  # noqa: E402
from tests.integrations import _trl_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 3


def sft_trainer(out: Path, **config) -> SFTTrainer:
    tok = tiny.char_tokenizer()
    lengths = [4, 9, 6, 12, 5, 8, 11, 7]  # micro-batches of different token counts: a mean of means is not the loss
    text = [("1+2=3. " * 4)[:n] for n in lengths] * 2
    args = SFTConfig(**common_args(out, STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2, **config))
    return SFTTrainer(
        model=tiny.causal_lm(tok), args=args, train_dataset=Dataset.from_dict({"text": text}), processing_class=tok
    )


def _logged(trainer, name: str) -> list[float]:
    return [h[name] for h in trainer.state.log_history if name in h and "train_runtime" not in h]


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_keel_records_the_loss_sft_trainer_optimises_and_its_statistics(tmp_path, loss_type):
    trainer = sft_trainer(tmp_path / "hf", loss_type=loss_type)
    callback = guard_trainer(trainer, run_dir=str(tmp_path / "run"))  # was refused: not a DPO/GRPO/Reward trainer
    trainer.train()
    with RunReader(tmp_path / "run") as run:
        losses = run.signal("loss")[1].tolist()
        accuracy = run.signal("trl/mean_token_accuracy")[1].tolist()
        assert run.meta()[META_KEY]["trainer"] == "SFTTrainer"
    assert losses == pytest.approx(_logged(trainer, "loss"), rel=1e-5)  # the Trainer's own logged loss, step by step
    assert accuracy == pytest.approx(_logged(trainer, "mean_token_accuracy"), rel=1e-5)
    assert callback.guard.global_step == STEPS


@pytest.mark.slow  # ~3 s: two SFT runs
def test_observe_on_sft_trainer_is_bit_identical(tmp_path):
    bare = sft_trainer(tmp_path / "bare")
    bare.train()
    guarded = sft_trainer(tmp_path / "keel")
    guard_trainer(guarded, policy="observe")
    guarded.train()
    pairs = zip(bare.model.parameters(), guarded.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
