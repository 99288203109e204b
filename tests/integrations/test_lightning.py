"""Lightning with KeelCallback: a real ``lightning.Trainer`` on CPU, automatic optimization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keel import TrainingAborted
from keel.store import RunReader

L = pytest.importorskip("lightning")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from keel.integrations.lightning import KeelCallback  # noqa: E402

STEPS = 10


class Regression(L.LightningModule):
    """A two-layer regressor; ``faults`` maps optimizer step → ``grad`` (NaN in a gradient) or ``loss`` (NaN loss)."""

    def __init__(self, faults: dict[int, str] | None = None, scheduler: str = "step") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
        self.faults, self.scheduler_interval = faults or {}, scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        if self.faults.get(self.trainer.global_step) == "loss":
            loss = loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.faults.get(self.trainer.global_step) == "grad":
            self.net[0].weight.grad[0, 0] = float("nan")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler_interval}}


def fit(
    callbacks,
    faults: dict[int, str] | None = None,
    *,
    scheduler: str = "step",
    accumulate: int = 2,
    ckpt_path: str | None = None,
    module_class: type[Regression] | None = None,
    **trainer_kwargs,
):
    torch.manual_seed(0)
    module = (module_class or Regression)(faults, scheduler)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * STEPS * accumulate, 8, generator=g)
    data = DataLoader(TensorDataset(x, torch.tanh(x[:, :4])), batch_size=16, shuffle=False)
    trainer = L.Trainer(
        max_steps=trainer_kwargs.pop("max_steps", STEPS),
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


def test_nan_gradient_is_skipped_with_accumulation_schedule_and_clipping_and_the_run_recorded(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip")
    trainer, module = fit([keel], {4: "grad"}, gradient_clip_val=0.5)
    assert [(d.step, d.action) for d in keel.guard.decisions] == [(4, "skip")]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    opt = trainer.optimizers[0]
    assert opt.state_dict()["state"][0]["step"].item() == STEPS - 1  # no trace of the skipped update
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS - 1  # nor in the schedule
    assert trainer.gradient_clip_val == 0.5  # keel clipped during fit, then gave the setting back
    with RunReader(tmp_path / "run") as store:
        assert [(d.step, d.action) for d in store.decisions()] == [(4, "skip")]
        assert store.findings(min_severity="critical")[0].evidence["parameters"] == ["net.0.weight"]
        steps, losses = store.signal("loss")
        assert steps.tolist() == list(range(STEPS)) and all(math.isfinite(v) for v in losses)
        _, norms = store.signal("grad/norm")
        assert max(n for i, n in enumerate(norms) if i != 4) > 0.5  # measured before clipping
        assert store.meta()["config"]["accumulate_grad_batches"] == 2


def test_nan_loss_is_skipped(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip")
    fit([keel], {6: "loss"}, accumulate=1)
    with RunReader(tmp_path / "run") as store:
        _, losses = store.signal("loss")
        assert math.isnan(losses[6])
        assert [(d.step, d.action) for d in store.decisions()] == [(6, "skip")]


def test_observe_is_bit_identical_to_bare_lightning():
    _, bare = fit([], gradient_clip_val=0.5)
    keel = KeelCallback(policy="observe")
    _, observed = fit([keel], gradient_clip_val=0.5)
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), observed.parameters(), strict=True))
    assert keel.guard.global_step == STEPS and keel.guard.findings == []


def test_an_epoch_scheduler_stays_lightnings_with_a_warning():
    from keel import KeelWarning

    with pytest.warns(KeelWarning, match="stay Lightning's"):
        keel = KeelCallback(policy="skip")
        fit([keel], scheduler="epoch", accumulate=1)
    assert keel.guard.state.scheduler is None


def test_abort_ends_fit_and_flushes_the_store(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip", max_consecutive_skips=1)
    with pytest.raises(TrainingAborted):
        fit([keel], {3: "grad", 4: "grad"}, accumulate=1)
    with RunReader(tmp_path / "run") as store:
        assert [(d.step, d.action) for d in store.decisions()] == [(3, "skip"), (4, "abort")]
        assert store.meta()["status"] == "aborted"


def test_fp16_grad_scaler_overflow_is_the_scalers_skip_and_observe_matches_bare():
    from lightning.pytorch.plugins import MixedPrecision

    def amp():  # Lightning picks no fp16 scaler on CPU by itself; this is the plugin it builds on CUDA
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)

    _, bare = fit([], {4: "loss"}, plugins=[amp()], accumulate=1)
    keel = KeelCallback(policy="observe")
    _, observed = fit([keel], {4: "loss"}, plugins=[amp()], accumulate=1)
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), observed.parameters(), strict=True))
    plugin = amp()
    keel = KeelCallback(policy="skip")
    trainer, module = fit([keel], {4: "loss"}, plugins=[plugin], accumulate=1)
    [d] = keel.guard.decisions
    assert (d.step, d.action, d.by) == (4, "skip", "scaler")  # the scaler's own skip, recorded, not counted
    assert plugin.scaler.get_scale() == 2.0**9
    assert trainer.optimizers[0].state_dict()["state"][0]["step"].item() == STEPS - 1
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS - 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_bad_guard_arguments_fail_when_the_callback_is_built():
    with pytest.raises(ValueError, match=r"KeelCallback: probs=...: not an argument of keel.Guard"):
        KeelCallback(probs="full")
    with pytest.raises(ValueError, match=r"KeelCallback: recovery='x'; allowed: None or a keel.RecoveryConfig"):
        KeelCallback(policy="recover", recovery="x")


def test_a_run_resumed_from_lightnings_checkpoint_is_numbered_from_its_global_step(tmp_path):
    trainer, _ = fit([KeelCallback(run_dir=tmp_path / "keel1", policy="skip")])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fit(
        [KeelCallback(run_dir=tmp_path / "keel2", policy="skip")],
        ckpt_path=str(tmp_path / "last.ckpt"),
        max_steps=STEPS + 3,
    )
    with RunReader(tmp_path / "keel2") as run:
        assert run.signal("loss")[0].tolist() == [STEPS, STEPS + 1, STEPS + 2]
