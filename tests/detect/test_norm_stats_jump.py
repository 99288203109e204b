"""Normalization-statistics jump: one finite batch far outside the data's scale is critical at its step, a skip
leaves the model as if the loop had never drawn it, and healthy BatchNorm runs stay silent.

Outside-in: the lead's CIFAR-style ResNet loop (/tmp/s15bn/cnn.py: BatchNorm, SGD with Nesterov momentum,
OneCycleLR per batch, label smoothing) with one batch of pixels x1e4. Before, keel found nothing (train-mode BatchNorm
normalizes with the batch's own statistics: loss and gradient norm stayed normal) while the first layer's running_var
went 0.3 -> 3e6 and every eval-mode forward after it was wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import keel
import keel.signals.norm_stats  # noqa: F401  (registers the probe)
from keel._core import Observation, keys
from keel.detect import default_detectors
from keel.detect.norm_stats_jump import NormStatsJumpConfig, NormStatsJumpDetector
from keel.signals.registry import DEFAULT_PROBES

STEPS, BAD = 12, 8


def _cnn() -> nn.Module:
    torch.manual_seed(0)

    def block(c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), block(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def _batches(batch_size: int = 16, scale: float = 1.0, offset: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3 * 8 * 8, 10, generator=g)
    out = []
    for _ in range(STEPS):
        x = torch.randn(batch_size, 3, 8, 8, generator=g)
        out.append((x * scale + offset, (x.flatten(1) @ w).argmax(1)))
    return out


def _corrupt(batches, factor: float):
    x, y = batches[BAD]
    return [*batches[:BAD], (x * factor, y), *batches[BAD + 1 :]]


def _with_norm_stats(detectors):
    return (
        detectors
        if any(isinstance(d, NormStatsJumpDetector) for d in detectors)
        else [*detectors, NormStatsJumpDetector()]
    )


def _train(batches, policy: str | None, tmp_path, lr: float = 0.2):
    """The loop; ``policy`` None: bare. Returns (model, guard decisions, findings)."""
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=lr / 2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=STEPS)
    watch = None
    if policy is not None:
        watch = keel.watch(
            model, opt, sched, run_dir=str(tmp_path / policy), policy=policy,
            probes=(*(p for p in DEFAULT_PROBES if p != "norm_stats"), "norm_stats"),
            detectors=_with_norm_stats(default_detectors()),
        )  # fmt: skip
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    try:
        for x, y in batches:
            model.train()
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
        decisions = [] if watch is None else [(d.step, d.action) for d in watch.guard.decisions]
        findings = [] if watch is None else list(watch.guard.findings)
    finally:
        if watch is not None:
            watch.close()
    return model, decisions, findings


def _jumps(findings):
    return [(f.step, f.severity) for f in findings if f.kind == "norm_stats_jump"]


def test_observe_finds_a_corrupt_batch_the_loss_and_gradient_detectors_miss(tmp_path) -> None:
    _, decisions, findings = _train(_corrupt(_batches(), 1e4), "observe", tmp_path)
    assert _jumps(findings) == [(BAD, "critical")]
    found = next(f for f in findings if f.kind == "norm_stats_jump")
    assert found.evidence["layer"] in (None, "1") and found.value > 1e6
    assert "data pipeline" in found.advice or "skip the update" in found.advice
    assert decisions == []


def test_skip_leaves_the_model_as_if_the_loop_had_never_drawn_the_batch(tmp_path) -> None:
    batches = _batches()
    guarded, decisions, _ = _train(_corrupt(batches, 1e4), "skip", tmp_path)
    assert decisions == [(BAD, "skip")]
    without, _, _ = _train([*batches[:BAD], *batches[BAD + 1 :]], None, tmp_path)  # bare, the batch left out
    for (name, a), b in zip(guarded.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights and running statistics, bit for bit
    guarded.eval()
    assert guarded[1].running_var.max() < 10  # not the poisoned ~1e7


@pytest.mark.parametrize(
    ("batch_size", "lr", "scale", "offset"),
    [(2, 0.8, 1.0, 0.0), (16, 0.05, 1.0, 0.0), (8, 0.2, 127.5, 128.0)],  # incl. pixels 0..255 from the first step
)
def test_healthy_batchnorm_runs_stay_silent(tmp_path, batch_size, lr, scale, offset) -> None:
    _, decisions, findings = _train(_batches(batch_size, scale, offset), "observe", tmp_path, lr=lr)
    assert _jumps(findings) == []


def _observe(det, jumps, start=0):
    return [
        (f.step, f.severity, f.evidence["accepted"])
        for s, j in enumerate(jumps, start)
        for f in det.update(Observation(step=s, values={keys.NORM_RUNNING_VAR_JUMP: j}))
    ]


def test_thresholds_a_lasting_change_of_scale_is_accepted_and_nan_is_left_to_the_non_finite_detector() -> None:
    det = NormStatsJumpDetector()
    assert _observe(det, [1.0, 3.6, 8.0, 19.9, 20.0, 1.0, math.nan, math.inf]) == [
        (2, "warning", False),
        (3, "warning", False),
        (4, "critical", False),
    ]
    # under skip the statistics are put back, so a lasting change of scale jumps at every step: the third is taken
    assert _observe(NormStatsJumpDetector(), [1.0, 500.0, 500.0, 500.0, 500.0]) == [
        (1, "critical", False),
        (2, "critical", False),
        (3, "warning", True),
        (4, "critical", False),
    ]
    det = NormStatsJumpDetector()  # steps that are not consecutive (a log read every n steps) start a new run
    assert [s for s, *_ in _observe(det, [500.0], 1) + _observe(det, [500.0], 3) + _observe(det, [500.0], 5)] == [
        1,
        3,
        5,
    ]


def test_state_round_trips_and_bad_settings_are_refused() -> None:
    det = NormStatsJumpDetector(critical=50.0)
    _observe(det, [1.0, 60.0])
    other = NormStatsJumpDetector()
    other.load_state_dict(det.state_dict())
    assert other.config.critical == 50.0 and _observe(other, [60.0], 2) == [(2, "critical", False)]
    assert _observe(other, [60.0], 3) == [(3, "warning", True)]
    for bad in ({"warning": 1.0}, {"warning": 10.0, "critical": 5.0}, {"accept_after": 1}, {"critical": math.inf}):
        with pytest.raises(ValueError, match="NormStatsJumpConfig"):
            NormStatsJumpConfig(**bad)


def test_a_lasting_change_of_the_data_scale_costs_two_skipped_updates_not_the_run(tmp_path) -> None:
    batches = _batches()
    rescaled = [*batches[:BAD], *((x * 100, y) for x, y in batches[BAD:])]  # from BAD on, every batch x100
    _, decisions, findings = _train(rescaled, "skip", tmp_path)
    assert decisions == [(BAD, "skip"), (BAD + 1, "skip")]  # the statistics put back each time: it jumps again
    assert _jumps(findings) == [(BAD, "critical"), (BAD + 1, "critical"), (BAD + 2, "warning")]  # then taken
