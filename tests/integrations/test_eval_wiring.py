"""The trainers' own evaluations reach the run store: the HF Trainer's ``on_evaluate`` metrics and Lightning's
validation metrics go to `Guard.record_eval` (real trainers on tiny models built from configs, CPU, no download)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keel._core import keys
from keel.integrations._eval import eval_metrics
from keel.store import RunReader


def _eval_signals(store: RunReader) -> set[str]:
    return {k for k in store.signal_keys() if k.startswith("eval/")}


# --- the shared choice of the followed metric --------------------------------------------------------------
@pytest.mark.parametrize(
    ("metrics", "follow", "greater", "expected"),
    [
        ({"accuracy": 0.9, "loss": 0.3}, None, None, (["loss", "accuracy"], "min")),
        ({"accuracy": 0.9, "loss": 0.3}, "accuracy", True, (["accuracy", "loss"], "max")),
        ({"accuracy": 0.9, "loss": 0.3}, "absent", True, (["loss", "accuracy"], "min")),  # not there: the default
        ({"f1": 0.5, "bleu": 0.2}, None, None, (["f1", "bleu"], "max")),
        (
            {"loss": torch.tensor(0.25), "n": torch.tensor([1.0, 2.0]), "ok": True, "s": "x"},
            None,
            None,
            (["loss"], "min"),
        ),
    ],
)
def test_eval_metrics_keeps_numbers_and_puts_the_followed_metric_first(metrics, follow, greater, expected):
    chosen = eval_metrics(metrics, follow=follow, greater_is_better=greater)
    assert chosen is not None and (list(chosen[0]), chosen[1]) == expected


def test_eval_metrics_without_a_number_is_none():
    assert eval_metrics({"note": "x", "flag": False}) is None


# --- Hugging Face -----------------------------------------------------------------------------------------
def _hf_trainer(tmp_path, keel, *, eval_dataset, steps: int = 2, **args_kwargs):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    )
    ids = torch.randint(0, 32, (64, 8), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **args_kwargs,
    )
    data = [{"input_ids": x, "labels": x} for x in ids]
    return transformers.Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=eval_dataset(data), callbacks=[keel]
    )


@pytest.mark.slow  # a real Trainer: ~2-3 s; the fast check of the same path is the next test
def test_hf_evals_are_recorded_per_dataset_at_each_eval_step_following_metric_for_best_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from keel.integrations.hf import KeelCallback

    def accuracy(pred):
        logits, labels = pred
        return {"accuracy": float((logits[:, :-1].argmax(-1) == labels[:, 1:]).mean())}

    keel = KeelCallback(run_dir=str(tmp_path / "run"), eval_tasks={"A": "A", "B": "B"})
    keel.phase("A")  # before train(): the Guard does not exist yet

    class SwitchToB(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                keel.phase("B")

    trainer = _hf_trainer(
        tmp_path,
        keel,
        eval_dataset=lambda data: {"A": data[:8], "B": data[8:16]},
        eval_on_start=True,
        metric_for_best_model="eval_A_accuracy",
        greater_is_better=True,
    )
    trainer.add_callback(SwitchToB())
    trainer.compute_metrics = accuracy
    trainer.train()
    trainer.evaluate()  # after train(): not part of the run
    theirs = [e["eval_B_loss"] for e in trainer.state.log_history if "eval_B_loss" in e]
    with RunReader(tmp_path / "run") as store:
        # one eval per dataset, the Trainer's prefix gone, runtime and throughput left out
        assert _eval_signals(store) == {"eval/A/accuracy", "eval/A/loss", "eval/B/accuracy", "eval/B/loss"}
        steps, values = store.signal("eval/B/loss")
        assert steps.tolist() == [0, 1]  # eval_on_start, then after the Trainer's update 2 (keel counts from 0)
        assert values.tolist() == pytest.approx(theirs[:2])
        evals = store.meta()["evals"]
        assert (evals["A"]["goal"], evals["B"]["goal"]) == ("max", "min")  # A follows accuracy, B its loss
        assert (evals["A"]["task"], evals["B"]["task"]) == ("A", "B")
        assert [(p["name"], p["step"]) for p in store.meta()["phases"]] == [("A", 0), ("B", 1)]
        # the evals feed the continual metrics: task A, finished at the switch, forgot (its value then − now)
        _, a = store.signal("eval/A/accuracy")
        forgetting_steps, forgetting = store.signal(keys.CONTINUAL_FORGETTING)
        # (recomputed after each dataset's eval: the Trainer reports A and B one after the other)
        assert set(forgetting_steps.tolist()) == {1} and forgetting.tolist() == pytest.approx([a[0] - a[1]] * 2)


def test_hf_on_evaluate_with_the_trainers_metric_names_reaches_the_store_fast(tmp_path):
    """The Trainer's calls in order, without a Trainer: train begins, an eval before the first update, two updates
    with an eval after each, train ends, an eval after it (the metric names as Trainer.evaluate writes them)."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from keel.integrations.hf import KeelCallback

    def metrics(loss: float, accuracy: float) -> dict[str, float]:
        return {
            "eval_A_loss": loss,
            "eval_A_accuracy": accuracy,
            "eval_A_runtime": 0.1,
            "eval_A_samples_per_second": 80.0,
            "eval_A_steps_per_second": 10.0,
            "epoch": 0.5,
        }

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = SimpleNamespace(
        metric_for_best_model="A_accuracy", greater_is_better=True, max_grad_norm=0.0, deepspeed=None, seed=0
    )
    args.to_dict = lambda: {}
    keel = KeelCallback(run_dir=str(tmp_path / "run"), eval_tasks={"A": "A"})
    keel.phase("A")
    keel.on_train_begin(args, None, None, model=model, optimizer=optimizer, lr_scheduler=None)
    keel.on_evaluate(args, None, None, metrics=metrics(2.0, 0.25))  # before the Guard exists
    for accuracy in (0.5, 0.75):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        keel.record_loss(loss)
        optimizer.step()
        optimizer.zero_grad()
        keel.on_evaluate(args, None, None, metrics=metrics(1.0, accuracy))
    keel.on_train_end(args, None, None)
    keel.on_evaluate(args, None, None, metrics=metrics(0.5, 1.0))  # after train(): not part of the run
    with RunReader(tmp_path / "run") as store:
        assert _eval_signals(store) == {"eval/A/accuracy", "eval/A/loss"}
        steps, values = store.signal("eval/A/accuracy")
        assert (steps.tolist(), values.tolist()) == ([0, 0, 1], [0.25, 0.5, 0.75])
        assert store.meta()["evals"]["A"] == {"every": None, "task": "A", "goal": "max"}
        assert [(p["name"], p["step"]) for p in store.meta()["phases"]] == [("A", 0)]


@pytest.mark.parametrize("eval_tasks", [["A"], {"A": ""}, {"A": 3}])
def test_hf_bad_eval_tasks_fail_when_the_callback_is_built(eval_tasks):
    pytest.importorskip("transformers")
    from keel.integrations.hf import KeelCallback

    with pytest.raises(ValueError, match=r"KeelCallback\(eval_tasks=.*\); allowed: None or a dict eval name"):
        KeelCallback(eval_tasks=eval_tasks)


def test_hf_phase_name_must_be_a_non_empty_str():
    pytest.importorskip("transformers")
    from keel.integrations.hf import KeelCallback

    with pytest.raises(ValueError, match=r"KeelCallback.phase\(name=''\); allowed: a non-empty str"):
        KeelCallback().phase("")


# --- Lightning --------------------------------------------------------------------------------------------
def test_lightning_validation_metrics_are_recorded_and_training_logs_and_the_sanity_check_are_not(tmp_path):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from keel.integrations.lightning import KeelCallback

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            logits = self.net(batch[0])
            self.log("val_loss", F.cross_entropy(logits, batch[1]))
            self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 8, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    keel = KeelCallback(run_dir=str(tmp_path / "run"))
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    trainer = L.Trainer(
        max_steps=10,
        val_check_interval=5,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[keel, checkpoint],
    )
    trainer.fit(Classifier(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    with RunReader(tmp_path / "run") as store:
        assert _eval_signals(store) == {"eval/val/val_acc", "eval/val/val_loss"}
        steps, values = store.signal("eval/val/val_loss")
        assert steps.tolist() == [4, 9]  # after updates 5 and 10, none for the sanity check
        assert values[-1] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
        assert store.meta()["evals"]["val"]["goal"] == "max"  # the checkpoint's monitor, val_acc, mode max
