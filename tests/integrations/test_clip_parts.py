"""keel.watch over a loop that clips parts of the model apart, a clip_grad_norm_ call each: the update is judged on
their norm together, as one call over both would give (reviewer V6 of session 13: judged on the last part's norm
alone, a x1e4 gradient spike in the first part was missed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import keel
from keel.store import RunReader


def _run(tmp_path, clip) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    encoder, decoder = nn.Linear(8, 8), nn.Linear(8, 1)
    model = nn.Sequential(encoder, nn.ReLU(), decoder)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = keel.watch(model, opt, policy="observe", run_dir=tmp_path / clip)
    whole = []
    for step in range(4):
        model(torch.randn(16, 8, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        whole.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type=2.0)))
        if clip == "parts":
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 0.5)
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), 0.5)
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), 0.5)  # again: its gradients are clipped already
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    watch.close()
    with RunReader(tmp_path / clip) as reader:
        return [float(v) for v in reader.signal("grad/norm")[1]], whole


@pytest.mark.parametrize("clip", ["whole", "parts"])
def test_the_update_is_judged_on_the_norm_of_every_part_before_clipping(tmp_path, clip):
    recorded, whole = _run(tmp_path, clip)
    assert recorded == pytest.approx(whole, rel=1e-6)
