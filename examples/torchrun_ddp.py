"""keel under torchrun: every rank decides on all-reduced signals, so all ranks skip or roll back together.

    torchrun --nproc_per_node=2 examples/torchrun_ddp.py --steps 100 --inject-nan 40 --bad-shard-from 60

Each rank trains a DDP copy of a small MLP on its own data shard (gloo on CPU, NCCL when GPUs are there).
``--inject-nan STEP`` puts a NaN into rank 1's gradient after DDP's all-reduce — only rank 1 sees it, yet
every rank skips that update. ``--bad-shard-from STEP`` gives rank 1 wrong targets from then on: every rank
skips the poisoned updates, then rolls back, and keel's per-rank detector names rank 1 as the source.
``--uneven N`` gives rank 1 N more batches than the others, the loop inside DDP's ``model.join()`` (uneven
inputs): keel agrees across ranks until a rank runs out of batches, then each rank decides on its own values.
Rank 0 writes the run store to ``--out``; each rank keeps its disk snapshots in ``--out/rank-<r>/snapshots``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import keel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--inject-nan", type=int, default=None, metavar="STEP")
    parser.add_argument("--bad-shard-from", type=int, default=None, metavar="STEP")
    parser.add_argument("--uneven", type=int, default=0, metavar="N", help="rank 1 gets N more batches (model.join)")
    parser.add_argument("--out", default="runs/ddp")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(
        nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4)).to(device),
        device_ids=[device.index] if cuda else None,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    teacher = torch.randn(16, 4, device=device)
    data = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own shard

    # Memory snapshots every 25 steps; every 2nd also goes to disk, per rank, under --out/rank-<r>/snapshots.
    # overwrite=True: each run of this example is a new run in --out (a real job would pass resume=True).
    guard = keel.Guard(
        model,
        optimizer,
        run_dir=args.out,
        policy="recover",
        overwrite=True,
        recovery=keel.RecoveryConfig(snapshot_every=25, disk_every=2),
    )
    steps = args.steps + (args.uneven if rank == 1 else 0)
    try:  # the Guard is made before the join, so a rank that has run out of batches answers keel's collective
        with model.join(enable=args.uneven > 0):
            for step in range(steps):
                x = torch.randn(64, 16, device=device, generator=data)
                y = torch.tanh(x @ teacher)
                if rank == 1 and args.bad_shard_from is not None and step >= args.bad_shard_from:
                    y = 3 * torch.randn(y.shape, device=device, generator=data)  # rank 1's shard went bad
                loss = F.mse_loss(model(x), y)
                loss.backward()
                if rank == 1 and step == args.inject_nan:
                    model.module[0].weight.grad[0, 0] = float("nan")
                decision = guard.step(loss)
                if rank == 0 and decision.action != "ok":
                    print(f"step {step}: every rank {decision.action}s — {decision.reason}", flush=True)
                optimizer.zero_grad(set_to_none=True)
    except keel.TrainingAborted as stop:  # every rank stops at the same step: their decisions are the same
        if rank == 0:
            print(f"aborted on every rank: {stop}")
    guard.close()
    if rank == 0:
        for finding in guard.findings:
            if finding.kind == "rank_outlier":
                print(
                    f"step {finding.step}: rank {finding.evidence['rank']} named ({finding.evidence['rule']}): "
                    f"{finding.cause}"
                )
        print(f"run store: {args.out}/run.sqlite")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
