"""A rollback backs keel's LR off and tightens its clip; a resume from the trainer's own checkpoint saved after it (the
HF Trainer's ``resume_from_checkpoint``, Lightning's ``ckpt_path``, each with a new KeelCallback, the docs' route)
started a new keel run with none of it: LR ×1 and the user's clip again, and nothing said (session 14's closing note:
the run went back to full LR, ×10 what the uninterrupted run trained at). Both callbacks keep keel's actions and its
escalation ladder in the checkpoint and put them back, said, when the resumed run starts."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from keel import RecoveryConfig
from keel._core import keys
from keel._core.finding import Finding
from keel.detect import default_detectors

ROLLBACK_AT, SAVE_AT, STEPS = 5, 8, 10


class TroubleAt:
    """A detector finding a divergence and a gradient spike at one step: the rollback backs the LR off and tightens
    the clip (``lr_backoff``, ``tighten_clipping``)."""

    name = "trouble_at"

    def __init__(self, step: int) -> None:
        self.step = step

    def update(self, obs):
        if obs.step != self.step:
            return []
        spike = Finding(step=obs.step, kind="grad_spike", severity="critical", signal=keys.GRAD_NORM, baseline=0.3)
        return [Finding(step=obs.step, kind="divergence", severity="critical", signal=keys.LOSS), spike]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _in_force(guard, step: int) -> tuple[list[float], float | None, list[int]]:
    return guard.actuator.lr_scales(step), guard.state.history["actions"].max_grad_norm, guard.escalation.rollback_steps


def _same(a, b) -> bool:
    """Equal as plain data, NaN equal to NaN (a detector keeps NaN for "no value yet")."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "keel's actions" in r.getMessage()]


SAID = (
    f"resumed at step {SAVE_AT} from a checkpoint saved after keel's rollbacks: keel's actions are in force again "
    f"(kept in the checkpoint): the LR × 0.1, the gradient clipped at 0.6; the escalation counts 1 earlier rollback"
)


def test_hf_a_resume_after_a_rollback_trains_at_keels_lr_and_clip_as_the_uninterrupted_run(tmp_path, caplog):
    pytest.importorskip("transformers")
    from keel.integrations.hf import KeelCallback
    from tests.integrations.test_hf import train
    from tests.integrations.test_trainer_resume_extension import StopAt

    def recover(**kwargs):
        return KeelCallback(policy="recover", recovery=RecoveryConfig(snapshot_every=2, quiet_steps=1), **kwargs)

    first = recover(detectors=[TroubleAt(ROLLBACK_AT)])
    kw = {"steps": STEPS, "accumulate": 1}
    train(tmp_path, [first, StopAt(SAVE_AT)], save_strategy="steps", save_steps=SAVE_AT, **kw)
    assert _in_force(first.guard, SAVE_AT) == ([0.1, 0.1], 0.6, [ROLLBACK_AT])
    checkpoint = tmp_path / "hf" / f"checkpoint-{SAVE_AT}"
    kept = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["keel"]
    assert kept["history"]["actions"]["lr_scale"] == 0.1

    resumed = recover()
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer = train(tmp_path, [resumed], resume=str(checkpoint), **kw)
    assert _in_force(resumed.guard, SAVE_AT) == ([0.1, 0.1], 0.6, [ROLLBACK_AT])  # before: [1.0, 1.0], 1.0's clip, []
    assert _said(caplog) == [SAID]
    uninterrupted = train(tmp_path / "whole", [recover(detectors=[TroubleAt(ROLLBACK_AT)])], **kw)
    for a, b in zip(trainer.model.parameters(), uninterrupted.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow  # ~2 s (two Trainer runs); the Lightning resume test backs the baselines by default
def test_hf_a_resume_starts_from_the_detectors_baselines_and_says_nothing_when_keel_changed_nothing(tmp_path, caplog):
    """The detectors' baselines travel too: a resumed run started them afresh on whatever level the checkpoint had (a
    run damaged before it was never found diverging: a run_clm-shaped run killed and resumed ended at loss 14,
    silently)."""
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from keel.integrations._carried import kept_baselines
    from keel.integrations.hf import KeelCallback
    from tests.integrations.test_hf import train

    train(tmp_path, [KeelCallback(policy="recover")], steps=6, accumulate=1, save_strategy="steps", save_steps=6)
    checkpoint = tmp_path / "hf" / "checkpoint-6"
    kept = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["keel"]
    resumed, started_with = KeelCallback(policy="recover"), []

    class AtTheStart(TrainerCallback):  # listed after KeelCallback: its Guard is built
        def on_train_begin(self, args, state, control, **kwargs):
            started_with.append(kept_baselines(resumed.guard))

    with caplog.at_level(logging.WARNING, logger="keel"):
        train(tmp_path, [resumed, AtTheStart()], steps=7, accumulate=1, resume=str(checkpoint))
    assert _same(started_with, [kept["baselines"]])  # before: each detector's fresh state
    assert any(kept["baselines"][k] for k in kept["baselines"])  # (the detectors had seen 6 steps)
    assert not [r for r in caplog.records if "resumed at step" in r.getMessage()]


def test_lightning_a_resume_after_a_rollback_keeps_keels_lr_and_clip(tmp_path, caplog):
    L = pytest.importorskip("lightning")
    from keel.integrations._carried import kept_baselines
    from keel.integrations.lightning import KeelCallback
    from tests.integrations.test_lightning import fit
    from tests.integrations.test_trainer_lightning_resume_extension import SaveAndStopAt

    def recover(**kwargs):
        return KeelCallback(policy="recover", recovery=RecoveryConfig(snapshot_every=1, quiet_steps=0), **kwargs)

    def detectors():  # the same in both runs: each detector's baselines go to its counterpart
        return [*default_detectors(), TroubleAt(ROLLBACK_AT)]

    first = recover(detectors=detectors())
    fit([first, SaveAndStopAt(SAVE_AT, tmp_path / "at8.ckpt")], gradient_clip_val=1.0)
    assert _in_force(first.guard, SAVE_AT) == ([0.1], 0.6, [ROLLBACK_AT])
    resumed, started_with = recover(detectors=detectors()), []

    class AtTheStart(L.Callback):  # listed after KeelCallback: its Guard is built
        def on_train_start(self, trainer, module):
            started_with.append(kept_baselines(resumed.guard))

    with caplog.at_level(logging.WARNING, logger="keel"):
        fit([resumed, AtTheStart()], ckpt_path=str(tmp_path / "at8.ckpt"), gradient_clip_val=1.0)
    assert _in_force(resumed.guard, SAVE_AT) == ([0.1], 0.6, [ROLLBACK_AT])  # before: [1.0], 1.0's clip, []
    assert _said(caplog) == [SAID]
    saved = torch.load(tmp_path / "at8.ckpt", weights_only=False)["callbacks"]
    [kept] = [state for name, state in saved.items() if name.startswith("KeelCallback")]
    assert _same(started_with, [kept["baselines"]]) and kept["baselines"]  # before: the detectors' fresh state


def test_lightning_a_resume_under_skip_says_the_checkpoints_actions_are_not_applied(tmp_path, caplog):
    pytest.importorskip("lightning")
    from keel.integrations.lightning import KeelCallback
    from tests.integrations.test_lightning import fit
    from tests.integrations.test_trainer_lightning_resume_extension import SaveAndStopAt

    first = KeelCallback(
        policy="recover", recovery=RecoveryConfig(snapshot_every=1, quiet_steps=0), detectors=[TroubleAt(ROLLBACK_AT)]
    )
    fit([first, SaveAndStopAt(SAVE_AT, tmp_path / "at8.ckpt")])
    with caplog.at_level(logging.WARNING, logger="keel"):
        fit([KeelCallback(policy="skip")], ckpt_path=str(tmp_path / "at8.ckpt"))
    said = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert len(said) == 1 and "policy 'skip'" in said[0] and "'lr_scale': 0.1" in said[0]


@pytest.mark.slow  # ~3 s (two Trainer runs); the Lightning abort test backs the advice by default
def test_hf_an_abort_in_a_resumed_run_names_the_trainers_earlier_checkpoints(tmp_path, caplog):
    """A run resumed from a checkpoint saved after an update that damaged it (before keel's rollback) aborts: keel's
    snapshots begin at that checkpoint. A run_clm-shaped run killed two updates after an LR surge aborted twice on
    relaunch, with nothing said of the checkpoint before the damaged one."""
    pytest.importorskip("transformers")
    from keel import TrainingAborted
    from keel.integrations.hf import KeelCallback
    from tests.integrations.test_hf import train
    from tests.integrations.test_trl import CriticalAt

    kw = {"steps": 12, "accumulate": 1, "save_strategy": "steps", "save_steps": 4}
    train(tmp_path, [KeelCallback(policy="recover")], **kw)
    resumed = KeelCallback(policy="recover", detectors=[CriticalAt(*range(8, 40))])  # never healthy again
    with caplog.at_level(logging.WARNING, logger="keel"), pytest.raises(TrainingAborted):
        train(tmp_path, [resumed], resume=str(tmp_path / "hf" / "checkpoint-8"), **kw)
    said = [r.getMessage() for r in caplog.records if "earlier checkpoint" in r.getMessage()]
    assert said == [
        "this run started from the trainer's checkpoint at step 8, and keel cannot go back before it: if the trouble "
        "began before that checkpoint was saved, resume from an earlier checkpoint (one of them, newest first: "
        "checkpoint-4) with a new run_dir"
    ]


def test_lightning_an_abort_in_a_resumed_run_names_the_earlier_checkpoints(tmp_path, caplog):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from keel import TrainingAborted
    from keel.integrations.lightning import KeelCallback
    from tests.integrations.test_lightning import Regression
    from tests.integrations.test_trl import CriticalAt

    def fit(keel, ckpt_path=None):
        torch.manual_seed(0)
        x = torch.randn(16 * 12, 8, generator=torch.Generator().manual_seed(0))
        saves = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        trainer = L.Trainer(
            max_steps=12,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[keel, saves],
        )
        data = DataLoader(TensorDataset(x, torch.tanh(x[:, :4])), batch_size=16)
        trainer.fit(Regression(), data, ckpt_path=ckpt_path)

    fit(KeelCallback(policy="recover"))
    resumed = KeelCallback(policy="recover", detectors=[CriticalAt(*range(8, 40))])
    with caplog.at_level(logging.WARNING, logger="keel"), pytest.raises(TrainingAborted):
        fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=8.ckpt"))
    said = [r.getMessage() for r in caplog.records if "earlier checkpoint" in r.getMessage()]
    assert said == [
        "this run started from the trainer's checkpoint at step 8, and keel cannot go back before it: if the trouble "
        "began before that checkpoint was saved, resume from an earlier checkpoint (one of them, newest first: "
        "epoch=0-step=4.ckpt) with a new run_dir"
    ]


@pytest.mark.slow  # ~2 s (a 10-update Trainer run)
def test_hf_the_trainers_logged_learning_rate_is_the_one_keels_back_off_applied(tmp_path, monkeypatch):
    """After a rollback that backed the LR off ×0.1 the Trainer logged the scheduler's LR, 10× the one the updates
    were made with (0.00225 logged, 0.000225 applied): its log (TensorBoard, W&B) hid keel's back-off."""
    pytest.importorskip("transformers")
    from keel.integrations.hf import KeelCallback
    from tests.integrations.test_hf import train

    applied, step = [], torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        applied.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    recovery = RecoveryConfig(snapshot_every=2, quiet_steps=1)
    keel = KeelCallback(policy="recover", recovery=recovery, detectors=[TroubleAt(ROLLBACK_AT)])
    trainer = train(tmp_path, [keel], steps=STEPS, accumulate=1)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    del logged[ROLLBACK_AT]  # the update rolled back: not made
    assert logged == pytest.approx(applied, rel=1e-6)  # before: ×10 from the rollback on
    assert applied[ROLLBACK_AT] < logged[ROLLBACK_AT - 1] / 5  # (the back-off is in force after the rollback)


def test_hf_keels_entry_is_written_for_each_checkpoint_and_only_then(tmp_path, monkeypatch):
    # the detectors' state was copied into the TrainerState at every step (~0.24 ms) though only a save reads it; an
    # epoch checkpoint (saved after on_epoch_end) still gets the entry
    pytest.importorskip("transformers")
    import keel.integrations.hf as hf
    from keel.integrations.hf import KeelCallback
    from tests.integrations.test_hf import train

    kept = []
    copy_baselines = hf.kept_baselines
    monkeypatch.setattr(hf, "kept_baselines", lambda guard: kept.append(guard.global_step) or copy_baselines(guard))
    # 256 examples, batch 4, 16 micro-batches per update: 4 updates an epoch
    train(tmp_path, [KeelCallback(policy="recover")], steps=6, accumulate=16, save_strategy="epoch")
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "hf").glob("checkpoint-*"))
    assert saved and len(kept) == len(saved) < 6
    for step in saved:
        state = json.loads((tmp_path / "hf" / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert "baselines" in state["stateful_callbacks"]["keel"]
