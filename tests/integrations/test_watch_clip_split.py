"""keel.watch keeps the norm *before* clipping when the loop clips in torch's two parts, as accelerate's
``Accelerator.clip_grad_norm_`` does (``torch.nn.utils.get_total_norm`` then ``clip_grads_with_norm_``, never
``clip_grad_norm_``): keel measured the clipped gradients there, so a gradient spike read as ``max_norm`` (helper D,
accelerate's by_feature/gradient_accumulation.py shape)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import keel
from keel.store import RunReader


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def _batch(step: int) -> torch.Tensor:
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(step)) * (100 if step == 2 else 1)


def _recorded_norms(run_dir) -> list[float]:
    with RunReader(run_dir) as reader:
        return [float(v) for v in reader.signal("grad/norm")[1]]


def test_torch_two_part_clipping_keeps_the_norm_before_clipping(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.watch(model, opt, policy="observe", run_dir=tmp_path / "run")
    returned = []
    for step in range(3):
        model(_batch(step)).pow(2).mean().backward()
        grads = [p.grad for p in model.parameters()]
        total = torch.nn.utils.get_total_norm(grads)
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), 0.01, total)
        returned.append(float(total))
        opt.step()
        opt.zero_grad()
    guard.close()
    assert returned[2] > 100 * returned[0]  # the spike
    assert _recorded_norms(tmp_path / "run") == pytest.approx(returned, rel=1e-6)


def test_accelerate_clip_grad_norm_keeps_the_norm_before_clipping(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    bare = _model()
    model, opt = acc.prepare(bare, torch.optim.SGD(bare.parameters(), lr=0.1))
    guard = keel.watch(model, opt, policy="observe", run_dir=tmp_path / "run")
    returned = []
    for step in range(3):
        acc.backward(model(_batch(step)).pow(2).mean())
        returned.append(float(acc.clip_grad_norm_(model.parameters(), 0.01)))
        opt.step()
        opt.zero_grad()
    guard.close()
    assert returned[2] > 100 * returned[0]
    assert _recorded_norms(tmp_path / "run") == pytest.approx(returned, rel=1e-6)
