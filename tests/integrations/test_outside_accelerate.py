"""keel on the loop of accelerate's examples/by_feature/gradient_accumulation.py (its ``accumulate()`` form), with the
``if accelerator.sync_gradients: accelerator.clip_grad_norm_(...)`` of its no_trainer and diffusers siblings, and the
two lines a user adds: ``import keel`` and ``keel.watch(model, optimizer, lr_scheduler, ...)`` after ``prepare``.
(One synchronised update per keel step is tests/integrations/test_watch_schedulers.py's; accelerate's two-part
clipping alone, test_watch.py's.) Bare, the NaN micro-batch of the first test leaves NaN weights, silently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import keel
from keel.store import RunReader

accelerate = pytest.importorskip("accelerate")

ACCUM, UPDATES, CLIP = 2, 6, 0.05


def _loop(policy: str | None, *, run_dir=None, nan_at: int = -1) -> tuple[keel.Guard | None, list, float, list]:
    """The example's loop on a tiny regressor: returns the guard, the weights, the final LR, and the norms the loop's
    ``accelerator.clip_grad_norm_`` returned (the norms before clipping)."""
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / UPDATES)  # a linear decay
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    watch = keel.watch(model, optimizer, lr_scheduler, policy=policy, run_dir=run_dir) if policy else None
    g = torch.Generator().manual_seed(0)
    norms, update = [], 0
    for _ in range(UPDATES * ACCUM):
        x = torch.randn(8, 4, generator=g)
        with accelerator.accumulate(model):
            output = model(x)
            loss = nn.functional.mse_loss(output, x[:, :1] * 3) * (float("nan") if update == nan_at else 1.0)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), CLIP)))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        update += accelerator.sync_gradients
    if watch is not None:
        watch.close()
    accelerator.free_memory()
    return watch, [p.detach().clone() for p in model.parameters()], lr_scheduler.get_last_lr()[0], norms


def test_observe_is_bit_identical_and_a_nan_micro_batch_skips_its_update_and_its_schedule_step():
    _, bare, bare_lr, _ = _loop(None)
    _, observed, observed_lr, _ = _loop("observe")
    assert observed_lr == bare_lr and all(torch.equal(a, b) for a, b in zip(bare, observed, strict=True))
    watch, params, lr, _ = _loop("skip", nan_at=3)
    assert [(d.step, d.action) for d in watch.decisions] == [(3, "skip")]
    assert all(torch.isfinite(p).all() for p in params)
    assert lr == pytest.approx(1e-2 * (1 - (UPDATES - 1) / UPDATES))  # the skipped update's schedule step withheld


def test_keel_records_the_norm_accelerators_clip_grad_norm_returned_before_clipping(tmp_path):
    watch, _, _, norms = _loop("observe", run_dir=tmp_path)
    with RunReader(tmp_path) as run:
        recorded = run.signal("grad/norm")[1].tolist()
    assert min(norms) > CLIP  # every update was clipped
    assert recorded == pytest.approx(norms, rel=1e-5)  # was [0.05] * 6, the clipped norm, before 5270366
