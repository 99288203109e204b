"""One rank of a job (DDP or FSDP2 ``fully_shard``, gloo, CPU) that one rank SIGKILLs; the same command resumes.

    torchrun --nproc_per_node=2 tests/distributed/kill_resume_worker.py OUT ddp|fsdp STEPS KILL_RANK KILL_AT

The loop is the shape a preemptible job runs (torchtitan, OLMo): every start passes ``resume=True`` and trains from
``guard.global_step``. Each rank's batch is a function of (rank, step), so a resumed run sees the uninterrupted run's
data. At step 20 a NaN lands in one weight (DDP: every replica; FSDP2: rank 0's shard): keel rolls back. Rank
KILL_RANK kills itself with SIGKILL right after ``guard.step`` of step KILL_AT (a disk snapshot write is in flight),
once per OUT (a marker file); with a sixth argument ``wait-for-disk``, once the disk snapshot of the step after it is
published (at most 1 s later). Writes ``start-rank<r>.json`` (the step this start resumed from) and, at the end,
``final-rank<r>.pt`` (full tensors).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from keel import Guard, RecoveryConfig

NAN_AT = 20


def wrap(net: nn.Sequential, mode: str) -> nn.Module:
    if mode == "ddp":
        return DDP(net)
    from torch.distributed.fsdp import fully_shard

    fully_shard(net[0])
    fully_shard(net[2])
    return fully_shard(net)


def flip_a_weight(net: nn.Sequential, rank: int) -> None:
    """A NaN in the first weight: on every DDP replica, in rank 0's shard under FSDP2."""
    with torch.no_grad():
        weight = net[0].weight
        if hasattr(weight, "to_local"):
            if rank == 0:
                weight.to_local()[0, 0] = float("nan")
        else:
            weight[0, 0] = float("nan")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 ``DTensor`` gathered from every rank's shard (a collective)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def published_or_not(folder: Path, seconds: float = 1.0) -> None:
    """Wait until the disk snapshot ``folder`` is published, or ``seconds`` pass (then it is not: kill anyway)."""
    deadline = time.monotonic() + seconds
    while not folder.exists() and time.monotonic() < deadline:
        time.sleep(0.002)


def main() -> None:
    out, mode, steps, kill_rank, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:6])
    wait_for_disk = sys.argv[6:] == ["wait-for-disk"]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    model = wrap(net, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    guard = Guard(
        model,
        opt,
        run_dir=str(out / "run"),
        policy="recover",
        resume=True,
        recovery=RecoveryConfig(snapshot_every=2, disk_every=1),
    )
    (out / f"start-rank{rank}.json").write_text(json.dumps(guard.global_step))
    marker = out / "killed"
    for i in range(guard.global_step, steps):
        g = torch.Generator().manual_seed(1000 * rank + i)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
        if i == NAN_AT:
            flip_a_weight(net, rank)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        if i == kill_at and rank == kill_rank and not marker.exists():
            marker.touch()
            if wait_for_disk:
                published_or_not(out / "run" / f"rank-{rank}" / "snapshots" / f"step-{i + 1:09d}")
            os.kill(os.getpid(), signal.SIGKILL)
    guard.close()
    torch.save({k: full(v) for k, v in net.state_dict().items()}, out / f"final-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
