"""The normalization-statistics probe: a step's move of each BatchNorm layer's running variance, against the
statistics of the last applied update.

Outside-in: the lead's CIFAR-style loop (/tmp/s15bn/cnn.py) with one batch of pixels x1e4: the loss and the gradient
norm stayed normal while the first BatchNorm's running_var went 0.3 -> 3e6. Here the probe reads the same kind of
layers as `keel.recover.running_stats` (BatchNorm, InstanceNorm with track_running_stats, lazy layers, buffers
replaced by ``model.to``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keel._core import keys
from keel.recover.running_stats import RunningStats
from keel.signals.norm_stats import NormStatsProbe, tracking_norm_layers
from tests.signals.contexts import step_context


def _probe(model: nn.Module) -> tuple[NormStatsProbe, torch.optim.Optimizer]:
    probe = NormStatsProbe()
    probe.attach(model)
    return probe, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # the probe reads no parameter


def _step(probe, model, opt, x, *, applied=True):
    """One forward of ``x`` and the probe's reading; ``applied``: the update went in (after_step is called)."""
    with torch.no_grad():
        model(x)
    ctx = step_context(model, opt)
    out = probe.measure(ctx)
    if applied:
        probe.after_step(ctx)
    return out


def _jump(out) -> float:
    return float(out[keys.NORM_RUNNING_VAR_JUMP])


def _mlp(**bn) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, **bn), nn.Linear(4, 4), nn.BatchNorm1d(4, **bn))


def test_a_corrupt_batch_jumps_healthy_batches_do_not_even_unnormalized_from_the_start() -> None:
    model = _mlp()
    probe, opt = _probe(model)
    g = torch.Generator().manual_seed(1)
    data = [torch.rand(8, 6, generator=g) * 255 for _ in range(7)]  # pixels 0..255, never normalized
    assert _step(probe, model, opt, data[0]) == {}  # the first step only sets the reference
    healthy = [_jump(_step(probe, model, opt, x)) for x in data[1:6]]
    assert max(healthy) < 2.0  # the move 1 -> 255^2/12 happened in the reference step
    out = _step(probe, model, opt, data[6] * 1e4)
    assert _jump(out) > 1e6
    assert out[keys.NORM_RUNNING_VAR_JUMP_PER_LAYER].names == ("1", "3")
    assert float(out[keys.NORM_RUNNING_VAR_JUMP_PER_LAYER].values[0]) == _jump(out)  # the first layer takes it


def test_a_skipped_update_is_not_the_reference_and_eval_steps_read_one() -> None:
    model = _mlp(momentum=None)  # a cumulative average
    probe, opt = _probe(model)
    x = torch.randn(8, 6)
    _step(probe, model, opt, x)
    stats = RunningStats.of(model)  # what skip/recover hold after each applied update
    assert stats is not None
    assert _jump(_step(probe, model, opt, x * 1e3, applied=False)) > 100  # critical: skipped
    assert stats.restore()  # keel puts the statistics back
    assert _jump(_step(probe, model, opt, x * 1e3)) > 100  # judged against the last applied update, not the skip
    model.eval()
    assert _jump(_step(probe, model, opt, x * 1e3)) == 1.0  # eval mode leaves the statistics as they are


def test_only_layers_that_track_running_statistics_are_read_and_none_costs_nothing() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.BatchNorm1d(3, track_running_stats=False),
        nn.InstanceNorm1d(3, track_running_stats=True),
        nn.LayerNorm(3),
        nn.SyncBatchNorm(3),
    )
    assert [name for name, _ in tracking_norm_layers(model)] == ["0", "2", "4"]
    plain = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    probe, opt = _probe(plain)
    assert probe.names == () and _step(probe, plain, opt, torch.randn(2, 3)) == {}


def test_instance_norm_statistics_are_judged_too() -> None:
    model = nn.Sequential(nn.InstanceNorm1d(3, track_running_stats=True))
    probe, opt = _probe(model)
    x = torch.randn(4, 3, 16)
    _step(probe, model, opt, x)
    assert _jump(_step(probe, model, opt, x)) < 1.1
    assert _jump(_step(probe, model, opt, x * 1e3)) > 1e4


def test_new_buffers_and_lazy_layers_set_a_new_reference_not_a_jump() -> None:
    model = nn.Sequential(nn.LazyBatchNorm1d())
    probe, opt = _probe(model)
    ctx = step_context(model, opt)
    assert probe.measure(ctx) == {}  # not materialized: nothing to read
    probe.after_step(ctx)
    x = torch.randn(8, 3) * 100
    assert _step(probe, model, opt, x) == {}  # its first forward made the buffers: the reference
    assert _jump(_step(probe, model, opt, x)) < 2.0
    model.double()  # new tensors: the reference was of the old ones
    assert _step(probe, model, opt, x.double() * 1e3) == {}
    assert _jump(_step(probe, model, opt, x.double() * 1e3)) < 2.0


def test_a_layer_still_at_its_initial_variance_is_not_judged_on_its_first_batch() -> None:
    torch.manual_seed(0)
    trunk, head = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    model = nn.Sequential(trunk, head)
    probe, opt = _probe(model)
    x = torch.randn(8, 3) * 300  # unnormalized
    head.eval()  # a head trained from a later step on (a branch, a model in eval mode for its first steps)
    _step(probe, model, opt, x)
    _step(probe, model, opt, x)
    head.train()
    with torch.no_grad():
        head(x)  # its first batch: running_var 1 -> ~9e3
    out = probe.measure(step_context(model, opt))
    assert float(out[keys.NORM_RUNNING_VAR_JUMP_PER_LAYER].values[1]) == 1.0
    assert _jump(out) < 2.0


def test_half_precision_statistics_are_measured_without_overflow() -> None:
    model = nn.Sequential(nn.BatchNorm1d(64)).half()  # a norm of 64 values of 3e4 is past float16's 65504
    probe, opt = _probe(model)
    ctx = step_context(model, opt)
    model[0].running_var.fill_(3e4)  # (set by hand: what a forward on unnormalized half inputs leaves)
    probe.measure(ctx)
    probe.after_step(ctx)
    model[0].running_var.fill_(3.3e4)
    assert _jump(probe.measure(ctx)) == pytest.approx(1.1, rel=1e-3)
