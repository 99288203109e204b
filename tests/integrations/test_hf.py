"""The Hugging Face Trainer with KeelCallback: a real Trainer on a tiny GPT-2 built from a config (no download)."""

from __future__ import annotations

import math

import pytest
import torch

from keel import TrainingAborted
from keel.store import RunReader

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from keel.integrations.hf import KeelCallback  # noqa: E402

STEPS = 8


class Inject(TrainerCallback):
    """Faults at given optimizer steps: ``grad`` (a NaN in one gradient), ``loss`` (a NaN loss from the forward
    pass), ``param`` (a NaN written into a weight)."""

    def __init__(self, faults: dict[int, str]) -> None:
        self.faults, self.step, self._hook = faults, -1, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def poison(module, inputs, output):
            return output * float("nan") if self.faults.get(self.step) == "loss" else output

        self._hook = model.transformer.wte.register_forward_hook(poison)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.step = state.global_step
        if self.faults.get(self.step) == "param":
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.faults.get(state.global_step) == "grad":
            model.transformer.h[1].attn.c_attn.weight.grad[0, 0] = float("nan")

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()


def train(
    tmp_path,
    callbacks,
    *,
    steps: int = STEPS,
    accumulate: int = 2,
    resume: str | None = None,
    trainer_class: type[Trainer] = Trainer,
    **args_kwargs,
):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    ids = torch.randint(0, 64, (256, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        learning_rate=3e-3,
        warmup_steps=2,
        lr_scheduler_type="linear",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        **{"save_strategy": "no", **args_kwargs},
    )
    trainer = trainer_class(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_nan_gradient_is_skipped_with_accumulation_and_schedule_and_the_run_recorded(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip")
    trainer = train(tmp_path, [Inject({5: "grad"}), keel])
    assert [(d.step, d.action) for d in keel.guard.decisions] == [(5, "skip")]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    inner = trainer.optimizer.optimizer
    assert inner.state_dict()["state"][0]["step"].item() == STEPS - 1  # the skipped update left no trace
    assert trainer.lr_scheduler.last_epoch == STEPS - 1  # nor did the schedule advance on it
    assert trainer.args.max_grad_norm == 1.0  # keel clipped during the run, then gave it back
    with RunReader(tmp_path / "run") as store:
        assert [(d.step, d.action) for d in store.decisions()] == [(5, "skip")]
        critical = store.findings(min_severity="critical")
        assert {f.step for f in critical} == {5} and "non_finite" in {f.kind for f in critical}
        steps, losses = store.signal("loss")
        assert steps.tolist() == list(range(STEPS))
        hf_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert losses.tolist() == pytest.approx(hf_losses, rel=1e-6)  # the Trainer's own loss, micro-batches summed
        meta = store.meta()
        assert meta["status"] == "finished" and meta["config"]["trainer"] == "transformers.Trainer"
        assert meta["config"]["args"]["gradient_accumulation_steps"] == 2


def test_a_nan_loss_hidden_by_logging_nan_inf_filter_is_still_seen(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip")
    trainer = train(tmp_path, [Inject({4: "loss"}), keel], accumulate=1)
    assert trainer.args.logging_nan_inf_filter  # the default
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(v) for v in logged)  # the Trainer's logs show no NaN at all ...
    with RunReader(tmp_path / "run") as store:
        steps, losses = store.signal("loss")
        assert math.isnan(losses[4]) and all(math.isfinite(v) for i, v in enumerate(losses) if i != 4)  # ... keel does
        assert [(d.step, d.action) for d in store.decisions()] == [(4, "skip")]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.slow
def test_observe_is_bit_identical_to_the_bare_trainer(tmp_path):
    bare = _params(train(tmp_path / "bare", []))
    keel = KeelCallback(policy="observe")
    observed = train(tmp_path / "observed", [keel])
    assert all(torch.equal(a, b) for a, b in zip(bare, _params(observed), strict=True))
    assert len(keel.guard.findings) == 0 and keel.guard.global_step == STEPS


def test_corrupted_weights_are_rolled_back(tmp_path):
    from keel import RecoveryConfig

    keel = KeelCallback(
        policy="recover", max_consecutive_skips=2, recovery=RecoveryConfig(snapshot_every=2, quiet_steps=1)
    )
    trainer = train(tmp_path, [Inject({4: "param"}), keel], accumulate=1)
    decisions = keel.guard.decisions  # NaN weights: a rollback at once, or after the capped skips
    assert decisions[0].step == 4 and decisions[-1].action == "rollback" and decisions[-1].step <= 6
    assert all(d.action == "skip" for d in decisions[:-1])
    assert decisions[-1].restored_step < 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.slow
def test_bf16_autocast_trains_under_keel(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip")
    trainer = train(tmp_path, [Inject({3: "grad"}), keel], bf16=True)
    assert [(d.step, d.action) for d in keel.guard.decisions] == [(3, "skip")]
    assert trainer.optimizer.optimizer.state_dict()["state"][0]["step"].item() == STEPS - 1


def test_abort_stops_trainer_train_with_the_store_flushed(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip", max_consecutive_skips=2)
    with pytest.raises(TrainingAborted, match="consecutive steps needed a skip"):
        train(tmp_path, [Inject({s: "grad" for s in range(3, STEPS)}), keel])
    with RunReader(tmp_path / "run") as store:
        assert [d.action for d in store.decisions()] == ["skip", "skip", "abort"]
        assert store.meta()["status"] == "aborted"


def test_arguments_the_trainer_owns_are_refused():
    with pytest.raises(ValueError, match=r"KeelCallback\(max_grad_norm, optimizer=...\): set by the Trainer"):
        KeelCallback(optimizer=None, max_grad_norm=1.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(probs="full"), r"KeelCallback: probs=...: not an argument of keel.Guard; allowed: .*probes"),
        (dict(policy="yolo"), r"KeelCallback: policy='yolo'; allowed: observe, skip, recover"),
        (dict(log_every=0), r"KeelCallback: log_every=0; allowed: an int >= 1"),
        (dict(run_dir=5), r"KeelCallback: run_dir=5; allowed"),
        (dict(take_over_clipping="yes"), r"KeelCallback\(take_over_clipping='yes'\); allowed: None, True or False"),
    ],
)
def test_bad_guard_arguments_fail_when_the_callback_is_built_not_at_the_first_step(kwargs, match):
    # the Guard itself is built when training begins (on_train_begin), deep inside trainer.train()
    with pytest.raises(ValueError, match=match):
        KeelCallback(**kwargs)


def test_a_run_resumed_from_the_trainers_checkpoint_is_numbered_from_the_trainers_step(tmp_path):
    # in a new run folder, keel numbered the resumed run from 0: a finding at the Trainer's step 6 was keel's step 2,
    # and the two stores could not be read as one run (helper H)
    train(tmp_path, [KeelCallback(run_dir=tmp_path / "keel1", policy="skip")], save_strategy="steps", save_steps=4)
    checkpoint = str(tmp_path / "hf" / "checkpoint-4")
    train(tmp_path, [KeelCallback(run_dir=tmp_path / "keel2", policy="skip")], save_strategy="no", resume=checkpoint)
    with RunReader(tmp_path / "keel2") as run:
        steps, _ = run.signal("loss")
        assert steps.tolist() == [4, 5, 6, 7] and run.meta()["first_step"] == 4
