"""KeelCallback builds its Guard when the Trainer's training begins: the hook probes see the first forward (step 0),
a model output without a loss gives keel the loss the Trainer backpropagates (label smoothing, ``compute_loss_func``,
a custom ``compute_loss``), a step with neither still warns and watches the gradients only, and a second
``trainer.train()`` with the same callback is refused up front, naming what to do, with nothing changed."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from keel import KeelWarning
from keel._core import keys
from keel.store import RunReader

transformers = pytest.importorskip("transformers")
from transformers import Trainer  # noqa: E402

from keel.integrations.hf import KeelCallback  # noqa: E402
from tests.integrations.test_hf import train  # noqa: E402


class Args:
    """The TrainingArguments fields the callback reads, for the fast checks that drive its events by hand."""

    deepspeed, seed, metric_for_best_model = None, 0, None

    def __init__(self, max_grad_norm: float = 0.0) -> None:
        self.max_grad_norm = max_grad_norm

    def to_dict(self):
        return {"max_grad_norm": self.max_grad_norm}


def _tiny():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=1)
    )
    return model, torch.optim.SGD(model.parameters(), lr=0.01), torch.randint(0, 16, (2, 8))


def _update(keel, model, optimizer, ids, *, labels=True, backward=None):
    """One update as the Trainer does it: forward, backward, the (gated) optimizer step. Returns the loss."""
    out = model(input_ids=ids, labels=ids if labels else None)
    loss = out.loss if labels else F.cross_entropy(out.logits[:, :-1].reshape(-1, 16), ids[:, 1:].reshape(-1))
    if backward is None:
        loss.backward()  # looked up now: Tensor.backward is gated while training
    else:
        backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def test_the_guard_exists_when_training_begins_and_its_hook_probes_see_the_first_forward(tmp_path):
    model, optimizer, ids = _tiny()
    keel = KeelCallback(run_dir=str(tmp_path), probes=["loss", "grad_norm", "activation_rms"])
    keel.on_train_begin(Args(), None, None, model=model, optimizer=optimizer)
    assert keel.guard is not None
    for _ in range(2):
        _update(keel, model, optimizer, ids)
    keel.on_train_end(Args(), None, None)
    with RunReader(tmp_path) as store:
        assert list(store.signal(keys.ACT_RMS)[0])[:1] == [0] and list(store.signal(keys.LOSS)[0]) == [0, 1]


def test_without_a_loss_in_the_output_keel_takes_the_loss_the_trainer_backpropagates(tmp_path):
    model, optimizer, ids = _tiny()
    keel = KeelCallback(run_dir=str(tmp_path))
    keel.on_train_begin(Args(), None, None, model=model, optimizer=optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)  # was: "saw no loss in the model's output", gradients only
        losses = [_update(keel, model, optimizer, ids, labels=False) for _ in range(2)]
    keel.on_train_end(Args(), None, None)
    with RunReader(tmp_path) as store:
        assert list(store.signal(keys.LOSS)[1]) == pytest.approx(losses, rel=1e-6)


def test_with_no_loss_in_the_output_nor_a_backward_of_one_the_callback_warns_once_and_drops_the_loss_probe(tmp_path):
    model, optimizer, ids = _tiny()
    keel = KeelCallback(run_dir=str(tmp_path))
    keel.on_train_begin(Args(), None, None, model=model, optimizer=optimizer)
    with pytest.warns(UserWarning, match="saw no loss in the model's output nor a backward") as caught:
        for _ in range(2):  # torch.autograd.backward(loss): not Tensor.backward, which keel sees
            _update(keel, model, optimizer, ids, labels=False, backward=torch.autograd.backward)
    keel.on_train_end(Args(), None, None)
    assert sum("saw no loss" in str(w.message) for w in caught) == 1
    with RunReader(tmp_path) as store:
        assert keys.LOSS not in store.signal_keys() and "loss" not in store.meta()["probes"]
        assert list(store.signal(keys.GRAD_NORM)[0]) == [0, 1]


def test_a_second_train_begin_into_the_same_run_dir_is_refused_before_anything_changes(tmp_path):
    model, optimizer, ids = _tiny()
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip")
    keel.on_train_begin(Args(1.0), None, None, model=model, optimizer=optimizer)
    _update(keel, model, optimizer, ids)
    keel.on_train_end(Args(), None, None)
    first = keel.guard
    args = Args(1.0)
    with pytest.raises(ValueError, match=r"second trainer\.train\(\).*run_dir") as refused:
        keel.on_train_begin(args, None, None, model=model, optimizer=optimizer)
    assert "callback.run_dir" in str(refused.value) and "overwrite=True" in str(refused.value)
    assert args.max_grad_norm == 1.0 and keel.guard is first and "step" not in vars(optimizer)  # not gated
    keel.run_dir = str(tmp_path / "second")
    keel.on_train_begin(args, None, None, model=model, optimizer=optimizer)
    assert keel.guard is not first and args.max_grad_norm == 0.0  # taken over again for this run
    keel.on_train_end(args, None, None)
    assert args.max_grad_norm == 1.0


@pytest.mark.slow  # the real Trainer, ~2-9 s each; the fast checks above drive the same events by hand
def test_the_hook_probes_measure_the_first_forward_at_step_0(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), probes=["loss", "grad_norm", "activation_rms"])
    train(tmp_path, [keel], steps=2, accumulate=1)
    with RunReader(tmp_path / "run") as store:
        assert list(store.signal(keys.ACT_RMS)[0])[:1] == [0]
        assert list(store.signal(keys.LOSS)[0]) == [0, 1]


class OwnLoss(Trainer):
    """A ``compute_loss`` that computes the loss outside the model: its output carries none."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        return (loss, logits) if return_outputs else loss


@pytest.mark.slow
def test_with_a_compute_loss_outside_the_model_keel_records_the_loss_the_trainer_logs(tmp_path, monkeypatch):
    import tests.integrations.test_hf as hf_tests

    monkeypatch.setattr(hf_tests, "Trainer", OwnLoss)
    keel = KeelCallback(run_dir=str(tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)  # was: "saw no loss", the gradients only
        trainer = train(tmp_path, [keel], steps=2, accumulate=2)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    with RunReader(tmp_path / "run") as store:
        assert list(store.signal(keys.LOSS)[1]) == pytest.approx(logged, abs=1e-4)  # the Trainer logs 4 decimals


@pytest.mark.slow
def test_a_second_train_with_the_same_callback_is_refused_before_anything_changes(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip")
    trainer = train(tmp_path, [keel], steps=2, accumulate=1, max_grad_norm=1.0)
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=r"second trainer\.train\(\).*run_dir") as refused:
        trainer.train()
    assert "callback.run_dir" in str(refused.value) and "overwrite=True" in str(refused.value)
    assert trainer.args.max_grad_norm == 1.0  # the Trainer's clipping is its own again
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters(), strict=True))
    with RunReader(tmp_path / "run") as store:  # the first train()'s run, as it was
        assert store.meta()["status"] == "finished" and list(store.signal(keys.LOSS)[0]) == [0, 1]
    keel.run_dir = str(tmp_path / "second")  # what the message says: the next train() is its own run
    trainer.train()
    with RunReader(tmp_path / "second") as store:
        assert store.meta()["status"] == "finished" and list(store.signal(keys.LOSS)[0]) == [0, 1]


def test_a_backward_of_a_non_scalar_is_not_taken_for_the_loss(tmp_path):
    model, optimizer, ids = _tiny()
    keel = KeelCallback(run_dir=str(tmp_path))
    keel.on_train_begin(Args(), None, None, model=model, optimizer=optimizer)
    with pytest.warns(UserWarning, match="saw no loss in the model's output nor a backward"):
        logits = model(input_ids=ids).logits
        logits.backward(torch.ones_like(logits))  # a vector-Jacobian product, not a loss
        optimizer.step()
    keel.on_train_end(Args(), None, None)
    with RunReader(tmp_path) as store:
        assert keys.LOSS not in store.signal_keys() and list(store.signal(keys.GRAD_NORM)[0]) == [0]
