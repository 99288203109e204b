"""A skipped update leaves BatchNorm's running statistics as they were (keel.recover.running_stats).

Outside-in: a CIFAR-style ResNet loop (BatchNorm, SGD with Nesterov momentum, OneCycleLR per batch) under
``keel.watch(policy="skip")``; one image of one batch NaN. Before, the update was skipped but the batch's forward had
already made every running_var NaN: training went on at a healthy-looking loss while every eval forward was NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import keel
from keel.recover.running_stats import RunningStats

STEPS, BAD = 8, 4


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=None),  # a cumulative average: num_batches_tracked weighs each batch
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(STEPS)]


def _poisoned(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = batches[BAD]
    x = x.clone()
    x[0, 0, 0, 0] = math.nan  # one pixel of one image
    return [*batches[:BAD], (x, y), *batches[BAD + 1 :]]


def _train(batches, policy: str | None, tmp_path) -> nn.Module:
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)
    watch = None if policy is None else keel.watch(model, opt, sched, run_dir=str(tmp_path / policy), policy=policy)
    try:
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if watch is not None:
            assert [(d.step, d.action) for d in watch.guard.decisions] == [(BAD, "skip")]
    finally:
        if watch is not None:
            watch.close()
    return model


def _eval_loss(model: nn.Module, batch) -> float:
    model.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(batch[0]), batch[1]).item()


@pytest.mark.parametrize("policy", ["skip", "recover"])
def test_a_skipped_batch_leaves_the_model_as_if_the_loop_had_never_drawn_it(tmp_path, policy) -> None:
    batches = _batches()
    guarded = _train(_poisoned(batches), policy, tmp_path)
    without = _train([*batches[:BAD], *batches[BAD + 1 :]], None, tmp_path)  # bare loop, the bad batch left out
    for (name, a), b in zip(guarded.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights, running_mean/var and num_batches_tracked, bit for bit
    assert math.isfinite(_eval_loss(guarded, batches[0]))


def test_observe_leaves_the_statistics_to_the_loop(tmp_path) -> None:
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with keel.watch(model, opt, run_dir=str(tmp_path / "observe"), policy="observe"):
        for x, y in _poisoned(_batches())[: BAD + 1]:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    assert torch.isnan(model[1].running_var).all()  # what the bare loop does: observe never changes training
    assert math.isnan(_eval_loss(model, _batches()[0]))


def test_statistics_are_found_in_every_layer_that_tracks_them_and_only_there() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.BatchNorm1d(3, track_running_stats=False),
        nn.InstanceNorm1d(3, track_running_stats=True),
        nn.LayerNorm(3),
    )
    stats = RunningStats.of(model)
    assert stats is not None
    assert [(id(b), n) for b, n in stats.owners] == [
        (id(model[i]._buffers), n) for i in (0, 2) for n in ("running_mean", "running_var", "num_batches_tracked")
    ]
    assert RunningStats.of(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))) is None


def test_buffers_replaced_after_the_guard_was_built_are_followed_not_overwritten() -> None:
    model = nn.Sequential(nn.LazyBatchNorm1d())
    stats = RunningStats.of(model)
    assert stats is not None and stats.saved is None  # not materialized yet: nothing to hold
    assert stats.restore() is False
    model(torch.randn(4, 3))  # the lazy layer's first forward makes its buffers
    stats.save()
    held = model[0].running_mean.clone()
    model(torch.randn(4, 3) + 5)
    assert stats.restore() and torch.equal(model[0].running_mean, held)
    model.double()  # new tensors (of another dtype): the copies held are of the old ones
    assert stats.restore() is False
    stats.save()
    model(torch.randn(4, 3, dtype=torch.float64))
    assert stats.restore() and model[0].running_mean.dtype == torch.float64


def test_after_a_rollback_the_statistics_are_finite_and_no_jump_is_seen(tmp_path) -> None:
    # the loop breaks a weight after an update: the next forward makes every running statistic NaN, the step rolls
    # back to a snapshot; the statistics restored with it are the norm_stats probe's reference from then on
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = _batches() * 4
    with keel.Guard(model, opt, policy="recover", run_dir=str(tmp_path / "rb")) as guard:
        for step, (x, y) in enumerate(batches):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
            if step == 12:
                with torch.no_grad():
                    model[0].weight[0, 0, 0, 0] = math.nan
    assert [d.action for d in guard.decisions] == ["rollback"]
    assert all(torch.isfinite(b).all() for b in model.buffers())
    assert [f for f in guard.findings if f.kind == "norm_stats_jump"] == []
