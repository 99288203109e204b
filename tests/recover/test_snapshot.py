"""Snapshot → perturb → restore gives bit-identical state and the same next random draws."""

import random

import numpy as np
import pytest
import torch

from keel.recover import SnapshotRing, TrainingState, restore
from tests.conftest import TinyNet, make_batches


def _setup():
    torch.manual_seed(0)
    model = TinyNet()
    model.register_buffer("counter", torch.zeros(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for x, y in make_batches(4):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rollback_is_bit_identical_including_rng():
    model, opt, sched = _setup()
    state = TrainingState(model=model, optimizer=opt, scheduler=sched)
    ring = SnapshotRing(capacity=2)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: {f: t.clone() for f, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    lr = sched.get_last_lr()
    snap = ring.take(4, state)
    ring.fence()
    expected = _draws()
    # perturb everything a snapshot covers
    for x, y in make_batches(3, seed=5):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.counter += 7
    _draws()
    restore(state, snap.tensors, snap.skeleton, snap.plain, resume=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for k, v in opt.state_dict()["state"].items():
        for f, t in v.items():
            assert torch.equal(t, moments[k][f]), (k, f)
    assert sched.get_last_lr() == lr
    assert _draws() == expected


def test_restored_training_continues_identically():
    model, opt, sched = _setup()
    state = TrainingState(model=model, optimizer=opt, scheduler=sched)
    ring = SnapshotRing()
    snap = ring.take(4, state)
    batches = make_batches(5, seed=9)

    def run():
        out = []
        for x, y in batches:
            loss = torch.nn.functional.mse_loss(model(x) + 0.01 * torch.randn(4), y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    ring.fence()  # in the Guard this happens before the next optimizer.step()
    first = run()
    restore(state, snap.tensors, snap.skeleton, snap.plain, resume=False)
    assert run() == first


def test_copy_is_fenced_before_the_tensors_change():
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ring = SnapshotRing()
    before = model.weight.detach().clone()
    snap = ring.take(0, TrainingState(model=model, optimizer=opt))
    ring.fence()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(snap.tensors["model/weight"], before)


def test_ring_keeps_the_last_k_and_reuses_buffers():
    model, opt, _ = _setup()
    state = TrainingState(model=model, optimizer=opt)
    ring = SnapshotRing(capacity=2)
    a = ring.take(10, state)
    ring.take(20, state)
    c = ring.take(30, state)
    ring.fence()
    assert [s.step for s in ring.snapshots] == [20, 30]
    assert c.tensors["model/fc1.weight"].data_ptr() == a.tensors["model/fc1.weight"].data_ptr()  # recycled
    assert ring.newest_before(25).step == 20 and ring.newest_before(5) is None
    ring.drop_after(20)
    assert [s.step for s in ring.snapshots] == [20]


def test_bad_capacity():
    with pytest.raises(ValueError, match="capacity=0; allowed"):
        SnapshotRing(capacity=0)
