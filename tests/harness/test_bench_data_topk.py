"""Found by `keel bench data`: an outlier ranked below ``Attribution.top_k`` is left off the skip list.

`keel.Attribution` says ``z`` is the score "above which an example is an offender; offenders go to the skip
list", and ``top_k`` the examples "recorded with the finding". The ledger takes the skip list's ids from the
recorded (top_k) offenders only, so a batch with more poisoned examples than ``top_k`` gets only ``top_k`` of them
skip-listed: in the poisoned-examples scenario with ``top_k=3`` and four identical poisoned windows per batch,
recall was 0.75 before `keel.guard.data_ledger` listed every outlier. Of the four scaled examples here, two are
outliers (336 and 339: losses 78 and 51, the batch's median ~1.4); the other two are classified right with full
confidence (loss ~0, gradient ~0) and did not cause the spike, so they are rightly not skip-listed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import keel
from keel.data import SkipList

N, BATCH, POISONED = 352, 16, (336, 337, 338, 339)  # four extreme examples in the batch of step 21


def _per_example(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_every_outlier_is_skip_listed_not_only_the_top_k(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=gen)
    y = x[:, :4].argmax(1)
    x[list(POISONED)] *= 300.0
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    attribution = keel.Attribution(loss_fn=_per_example, top_k=1)
    with keel.Guard(model, opt, run_dir=str(tmp_path), policy="skip", attribution=attribution) as guard:
        for start in range(0, N, BATCH):
            batch = (x[start : start + BATCH], y[start : start + BATCH])
            loss = _per_example(model, batch).mean()
            loss.backward()
            guard.step(loss, batch_ids=range(start, start + BATCH), batch=batch)
            opt.zero_grad(set_to_none=True)
    assert any(d.step == 21 and d.action == "skip" for d in guard.decisions)  # the poisoned batch was caught
    attributed = next(f for f in guard.findings if "offenders" in f.evidence)
    assert [o["id"] for o in attributed.evidence["offenders"]] == [336]  # top_k 1 recorded
    assert SkipList(tmp_path).ids() == {336, 339}  # every outlier skip-listed
