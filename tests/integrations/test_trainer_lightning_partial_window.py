"""Lightning steps the short accumulation window at an epoch's end (5 batches, ``accumulate_grad_batches=4``: a
window of 4, then one of 1) and divides its loss by 4 all the same. keel records that step's loss as the mean of its
micro-batches, as every full window's (reviewer V's V12: it was a quarter of it, a saw-tooth in the store)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel.store import RunReader

L = pytest.importorskip("lightning")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from keel.integrations.lightning import KeelCallback  # noqa: E402
from tests.integrations.test_lightning import Regression  # noqa: E402


class KeepsItsLosses(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.losses: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.losses.setdefault(self.trainer.global_step, []).append(loss.item())
        return loss


def test_the_short_window_at_an_epochs_end_is_recorded_as_its_mean_loss(tmp_path):
    torch.manual_seed(0)
    module = KeepsItsLosses()
    x = torch.randn(16 * 5, 8, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, torch.tanh(x[:, :4])), batch_size=16, shuffle=False)
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="observe")
    trainer = L.Trainer(
        max_epochs=2,
        accumulate_grad_batches=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[keel],
    )
    trainer.fit(module, data)
    with RunReader(tmp_path / "run") as store:
        steps, recorded = store.signal("loss")
    assert [len(module.losses[s]) for s in steps.tolist()] == [4, 1, 4, 1]
    expected = [sum(module.losses[s]) / len(module.losses[s]) for s in steps.tolist()]
    assert recorded.tolist() == pytest.approx(expected, rel=1e-5)
