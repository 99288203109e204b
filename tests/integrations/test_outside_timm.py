"""keel.watch on timm's train.py shape: its ``NativeScaler`` (``loss_scaler``) drives a GradScaler it holds as
``_scaler``; the loss is divided by the accumulation steps before backward; clipping between unscale_ and step.
timm is not a keel dependency, so `NativeScaler` below is timm.utils.cuda.NativeScaler's code (timm 1.0.31)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import keel
from keel._core.errors import KeelWarning
from keel.store import RunReader

ACCUM, UPDATES = 2, 24


class NativeScaler:
    """timm.utils.cuda.NativeScaler (timm 1.0.31), its ``__call__`` as written there."""

    def __init__(self, device: str = "cuda") -> None:
        self._scaler = torch.amp.GradScaler(device=device)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, need_update=True):
        self._scaler.scale(loss).backward()
        if need_update:
            if clip_grad is not None:
                self._scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
            self._scaler.step(optimizer)
            self._scaler.update()


def _train(policy: str | None, run_dir=None, *, nan_at: int = -1):
    """train_one_epoch's update: ``_loss /= accum_steps``, ``loss_scaler(_loss, optimizer, need_update=...)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_scaler = NativeScaler(device="cpu")
    watch = keel.watch(model, optimizer, scaler=loss_scaler, policy=policy, run_dir=run_dir) if policy else None
    losses = []
    for batch_idx in range(UPDATES * ACCUM):
        x = torch.randn(8, 4)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        if batch_idx // ACCUM == nan_at:
            loss = loss * float("nan")
        losses.append(loss.item())
        loss_scaler(loss / ACCUM, optimizer, clip_grad=1.0, parameters=model.parameters(),
                    need_update=(batch_idx + 1) % ACCUM == 0)  # fmt: skip
        if (batch_idx + 1) % ACCUM == 0:
            optimizer.zero_grad()
    if watch is not None:
        watch.close()
    return [p.detach().clone() for p in model.parameters()], losses, loss_scaler, watch


def test_timms_native_scaler_is_taken_as_the_grad_scaler_it_holds(tmp_path):
    _, losses, _, _ = _train("observe", tmp_path)
    run = RunReader(tmp_path)
    try:
        stored = run.signal("loss")[1].tolist()
    finally:
        run.close()
    # the step's loss: the mean of its micro-batches, unscaled (before, watch refused the NativeScaler)
    expected = [sum(losses[i : i + ACCUM]) / ACCUM for i in range(0, len(losses), ACCUM)]
    assert stored == pytest.approx(expected, rel=1e-5)


def test_under_observe_timms_update_is_bit_identical_to_the_bare_one():
    watched, *_ = _train("observe")
    bare, *_ = _train(None)
    assert all(torch.equal(p, q) for p, q in zip(watched, bare, strict=True))


def test_a_nan_loss_is_the_scalers_skip_and_the_scale_halves_once():
    params, _, loss_scaler, watch = _train("skip", nan_at=20)
    assert [(d.step, d.action, d.by) for d in watch.decisions] == [(20, "skip", "scaler")]
    assert all(p.isfinite().all() for p in params)
    _, _, bare_scaler, _ = _train(None, nan_at=20)
    assert loss_scaler._scaler.get_scale() == bare_scaler._scaler.get_scale() < 65536.0


def test_a_grad_scaler_keel_was_not_given_is_named_once():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_scaler = NativeScaler(device="cpu")
    watch = keel.watch(model, optimizer, policy="observe")  # no scaler=: keel would see the loss × 65536
    with pytest.warns(KeelWarning, match=r"scaler=scaler") as caught:
        for _ in range(3):
            loss_scaler(model(torch.randn(8, 4)).pow(2).mean(), optimizer)
            optimizer.zero_grad()
    watch.close()
    assert sum("GradScaler keel was not given" in str(w.message) for w in caught) == 1


def test_a_grad_scaler_keel_was_given_is_not_warned_about():
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)
        _train("observe")
