"""A preemptible Lightning job restarted with the same command (``trainer.fit(model, data, ckpt_path="last")`` with a
``ModelCheckpoint(save_last=True)``, and the same ``KeelCallback(run_dir=...)``) keeps one keel run across SIGKILLs:
before, the restart was refused as "a previous run" (or, with ``overwrite=True``, keel deleted its own store at each
restart) — the HF Trainer's R8 (reviewer R, session 16), in Lightning. Each segment runs in a forked child that
SIGKILLs itself (`tests.integrations.test_hf_restart`)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

L = pytest.importorskip("lightning")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from keel.integrations.lightning import KeelCallback  # noqa: E402
from keel.store import RunReader  # noqa: E402
from tests.integrations._forked import run_forked  # noqa: E402
from tests.integrations.test_hf_restart import _loss_steps  # noqa: E402
from tests.integrations.test_lightning import Regression  # noqa: E402

STEPS, SAVE = 12, 4  # a checkpoint at each epoch's end, every SAVE steps


class Preempt(L.Callback):
    """SIGKILL at the end of update ``at`` (after ModelCheckpoint's save of it, when it saves there)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def _job(out, kill_at: int | None, with_keel: bool) -> None:
    torch.manual_seed(0)
    module = Regression(None, "step")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * SAVE, 8, generator=g)  # an epoch of SAVE steps: Lightning resumes a plain loader only there
    data = DataLoader(TensorDataset(x, torch.tanh(x[:, :4])), batch_size=16, shuffle=False)
    saves = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_last=True)
    callbacks = [saves, KeelCallback(run_dir=str(out / "keel"), policy="recover")] if with_keel else [saves]
    callbacks += [Preempt(kill_at)] if kill_at is not None else []
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=callbacks,
    )
    trainer.fit(module, data, ckpt_path="last" if (out / "ckpt" / "last.ckpt").exists() else None)
    torch.save(module.state_dict(), out / "final.pt")


def _run(out, kill_at: int | None = None, *, with_keel: bool = True) -> int:
    """The job in a forked child; the signal that ended it (SIGKILL: preempted), or its exit code."""
    return run_forked(out, lambda: _job(out, kill_at, with_keel))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_lightning_job_killed_between_checkpoints_and_run_again_keeps_one_store_and_the_weights(tmp_path):
    """Lightning's own restart is not bit-identical to the uninterrupted run here, keel or not (max |Δw| 3.8e-3 on
    this CPU): the weights are compared with the same job killed and restarted without keel."""
    job, whole, bare = tmp_path / "job", tmp_path / "whole", tmp_path / "bare"
    assert _run(job, kill_at=6) == signal.SIGKILL  # last.ckpt is step 4's; steps 4, 5 are done again
    with RunReader(job / "keel") as store:
        first_id = store.meta()["run_id"]
    assert _run(job) == 0
    assert _run(whole) == 0
    with RunReader(job / "keel") as store:
        meta = store.meta()
    assert meta["run_id"] == first_id and meta["status"] == "finished" and meta["resumed_from"] == 4
    assert _loss_steps(job / "keel") == _loss_steps(whole / "keel") == list(range(STEPS))
    assert _run(bare, kill_at=6, with_keel=False) == signal.SIGKILL and _run(bare, with_keel=False) == 0
    x, y = torch.load(job / "final.pt"), torch.load(bare / "final.pt")
    assert all(torch.equal(x[k], y[k]) for k in x)
    said = (job / "console.log").read_text()
    assert f"checkpoint at step 4, written by keel run {first_id[:8]}: keel continues that run" in said
