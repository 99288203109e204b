"""``TrainingArguments(auto_find_batch_size=True)`` (HF's PEFT/LoRA notebooks, many fine-tuning scripts): on an
out-of-memory the Trainer halves the batch and runs its inner loop again — a second ``on_train_begin`` inside the same
``train()``. keel refused it as "a second trainer.train()" with a run_dir (the run the Trainer would have recovered
ended), and warned of an interrupt without one (reviewer V's V5)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from keel import KeelWarning
from keel.store import RunReader

pytest.importorskip("transformers")
from transformers import TrainerCallback  # noqa: E402

from keel.integrations.hf import KeelCallback  # noqa: E402
from tests.integrations.test_hf import train  # noqa: E402


class OutOfMemoryOnce(TrainerCallback):
    """The first training forward fails as a CPU allocation does (the text accelerate's retry matches)."""

    def __init__(self) -> None:
        self.raised, self.hook = False, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def fail_once(module, inputs, output):
            if not self.raised and module.training:
                self.raised = True
                raise RuntimeError(
                    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes."
                )

        if self.hook is None:
            self.hook = model.transformer.wte.register_forward_hook(fail_once)

    def on_train_end(self, args, state, control, **kwargs):
        self.hook.remove()


@pytest.mark.parametrize("run_dir", [pytest.param(None, marks=pytest.mark.slow), "run"])
def test_the_trainers_out_of_memory_retry_is_the_same_run(tmp_path, caplog, run_dir):
    keel = KeelCallback(policy="skip", run_dir=None if run_dir is None else str(tmp_path / run_dir))
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="keel"):
        warnings.simplefilter("error", KeelWarning)  # no "ended without on_train_end (an interrupt)"
        trainer = train(tmp_path, [OutOfMemoryOnce(), keel], steps=2, accumulate=1, auto_find_batch_size=True)
    assert (
        trainer.state.train_batch_size == 3 and trainer.state.global_step == 2
    )  # the Trainer's retry, accelerate's 0.9: batch 4 → 3
    assert keel.guard.global_step == 2 and keel.guard._closed
    assert not hasattr(torch.Tensor.backward, "__wrapped__")
    assert not [r for r in caplog.records if "failed" in r.getMessage()]  # the aborted attempt is closed quietly
    said = [r.getMessage() for r in caplog.records if "out-of-memory" in r.getMessage()]
    assert said == [
        "the Trainer restarted its loop with batch size 3 after an out-of-memory (auto_find_batch_size): "
        "keel starts its run over"
    ]
    if run_dir is not None:
        with RunReader(tmp_path / run_dir) as store:
            assert store.meta()["status"] == "finished" and store.meta()["steps"] == 2
            assert store.signal("loss")[0].tolist() == [0, 1]


class OutOfMemoryAfterTheLoss(TrainerCallback):
    """The first training step fails after the model's forward returned its loss (where a backward runs out)."""

    def __init__(self) -> None:
        self.raised, self.hook = False, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def fail_once(module, inputs, output):
            if not self.raised and module.training:
                self.raised = True
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TiB.")

        if self.hook is None:  # after KeelCallback's loss hook: keel has taken this forward's loss
            self.hook = model.register_forward_hook(fail_once)

    def on_train_end(self, args, state, control, **kwargs):
        self.hook.remove()


@pytest.mark.slow
def test_the_aborted_attempts_loss_is_not_counted_in_the_restarted_first_step(tmp_path):
    keel = KeelCallback(policy="skip", run_dir=str(tmp_path / "run"))
    trainer = train(tmp_path, [keel, OutOfMemoryAfterTheLoss()], steps=2, accumulate=1, auto_find_batch_size=True)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with RunReader(tmp_path / "run") as store:
        assert store.signal("loss")[1].tolist() == pytest.approx(logged, rel=1e-5)
