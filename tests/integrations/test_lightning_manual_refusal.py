"""KeelCallback with Lightning's manual optimization (``automatic_optimization = False``, Lightning's GAN example):
refused up front, also under observe, with a message that offered no way to keep the user's module (reviewer V's V3).
The refusal now names what works: a ``keel.watch`` per model and optimizer made in the module's ``on_train_start``
(`tests/integrations/test_watch_lightning_manual.py` runs that path)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
from keel.integrations.lightning import KeelCallback  # noqa: E402


class _Manual(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.automatic_optimization = False

    def training_step(self, batch, i):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.net(batch[0]).pow(2).mean())
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("policy", ["observe", "skip"])
def test_manual_optimization_is_refused_naming_keel_watch_per_optimizer(policy):
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[KeelCallback(policy=policy)],
    )
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    with pytest.raises(ValueError) as refused:
        trainer.fit(_Manual(), data)
    message = str(refused.value)
    assert "automatic_optimization=False" in message
    assert "keel.watch(self.D, opt_d.optimizer" in message and "on_train_start" in message
    assert "adversarial_detectors()" in message and ".close()" in message
    assert not hasattr(torch.Tensor.backward, "__wrapped__")
