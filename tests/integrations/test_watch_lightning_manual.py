"""keel.watch under Lightning's manual optimization (``automatic_optimization = False``; Lightning's own GAN
example's shape: ``self.manual_backward(loss)``, then ``opt.step()`` per optimizer). Lightning's
``LightningOptimizer.step()`` calls the torch optimizer as ``step(closure=<its precision plugin's closure>)`` every
time; keel.watch passed any closure through unwatched, so a watch per model made in ``on_train_start`` guarded nothing:
no keel step, and a NaN gradient reached the discriminator's weights (reviewer V3 of session 14). It now runs the
closure once, as torch's single-evaluation optimizers do, then makes its update."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel._core.errors import KeelWarning
from keel.integrations.watch import adversarial_detectors

L = pytest.importorskip("lightning")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

STEPS = 8
NAN_AT = 3


class _GAN(L.LightningModule):
    """A generator and a discriminator, two Adams, manual optimization; a NaN in D's gradient at ``nan_at``."""

    def __init__(self, policy: str | None, nan_at: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.G, self.D = nn.Linear(4, 8), nn.Linear(8, 1)
        self.automatic_optimization = False
        self.policy, self.nan_at, self.n = policy, nan_at, 0
        self.watches: list[keel.Watch] = []
        self.closure_results: list[object] = []

    def on_train_start(self) -> None:
        if self.policy is not None:
            opt_g, opt_d = self.optimizers()
            kw = {"policy": self.policy, "detectors": adversarial_detectors()}
            self.watches = [keel.watch(self.D, opt_d.optimizer, **kw), keel.watch(self.G, opt_g.optimizer, **kw)]

    def on_train_end(self) -> None:
        for w in self.watches:
            w.close()

    def training_step(self, batch: list[torch.Tensor], i: int) -> None:
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(x.shape[0], 4)
        loss_d = F.softplus(self.D(self.G(z).detach())).mean() + F.softplus(-self.D(x)).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        if self.n == self.nan_at:
            self.D.weight.grad[0, 0] = float("nan")
        opt_d.step()
        loss_g = F.softplus(-self.D(self.G(z))).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        self.closure_results.append(opt_g.step(closure=lambda: loss_g.detach()))  # a closure of the loop's own
        self.n += 1

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.G.parameters(), 1e-3), torch.optim.Adam(self.D.parameters(), 1e-3)]


def _fit(policy: str | None, nan_at: int = -1) -> _GAN:
    gan = _GAN(policy, nan_at)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16 * STEPS, 8, generator=g)), 16)
    trainer = L.Trainer(
        max_steps=2 * STEPS,  # Lightning counts each optimizer's step
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        trainer.fit(gan, data)
    finally:  # a fit that failed never reached on_train_end: no gate is left on torch
        gan.on_train_end()
    return gan


def test_a_watch_per_model_guards_lightnings_manual_optimization():
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)  # no "passed through unwatched"
        gan = _fit("skip", nan_at=NAN_AT)
    watch_d, watch_g = gan.watches
    assert [(d.step, d.action) for d in watch_d.decisions] == [(NAN_AT, "skip")]
    assert watch_d.global_step == watch_g.global_step == STEPS
    assert all(torch.isfinite(p).all() for p in gan.parameters())
    assert not hasattr(torch.Tensor.backward, "__wrapped__")  # every gate put back at on_train_end


def test_observe_leaves_the_manual_loop_as_it_was_and_step_returns_the_closures_result():
    bare, watched = _fit(None), _fit("observe")
    for p, q in zip(bare.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [float(r) for r in watched.closure_results] == [float(r) for r in bare.closure_results]
