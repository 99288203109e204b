"""V13 of session 13: one rank's corrupt example spikes the step; the other rank's batch is healthy but, being
squared errors, heavy-tailed (its most extreme example lies far above z 6 against its own batch). Writes JSON.

    torchrun --nproc_per_node=2 tests/distributed/attribution_healthy_worker.py OUT_DIR

Rank 1's example 981 (step 30) has target 1000. Only it may reach the skip list; rank 0's healthy examples must not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import keel
from keel.data import SkipList
from keel.signals.attribution import example_losses, rank_offenders

STEPS, CORRUPT_STEP, BATCH = 40, 30, 16


def per_example(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean(1)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    attribution = keel.Attribution(loss_fn=per_example)
    guard = keel.Guard(model, opt, run_dir=out / "run", policy="skip", attribution=attribution)
    g = torch.Generator().manual_seed(rank)
    healthy_outliers: list[int] = []
    for step in range(STEPS):
        x = torch.randn(BATCH, 16, generator=g)
        y = x[:, :1].clone()
        if rank == 1 and step == CORRUPT_STEP:
            y[5] = 1000.0
        ids = list(range((step * 2 + rank) * BATCH, (step * 2 + rank + 1) * BATCH))
        if rank == 0 and step == CORRUPT_STEP:  # what the batch's own ranking alone calls an outlier
            losses = example_losses(model, per_example, (x, y)).tolist()
            healthy_outliers = [o.id for o in rank_offenders(losses, ids, top_k=BATCH, z=attribution.z) if o.outlier]
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        guard.step(loss, batch_ids=ids, batch=(x, y))
        opt.zero_grad()
    guard.close()
    listed = SkipList(out / "run").entries if rank == 0 else []
    result = {
        "decisions": [(d.step, d.action) for d in guard.decisions if d.action != "ok"],
        "healthy_outliers": healthy_outliers,
        "skip_listed": sorted({i for e in listed for i in e.ids}),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
