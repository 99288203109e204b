"""4 ranks as 2 data-parallel groups ({0, 1} and {2, 3}: 2-way tensor x 2-way data parallel), each group's Guard
given ``DistributedConfig(process_group=<its group>)`` and the job's one run_dir; writes each rank's actions as JSON.

    torchrun --nproc_per_node=4 tests/distributed/subgroup_worker.py OUT_DIR [resume]

Rank 1's gradient gets a NaN at step 3: group {0, 1} skips it, group {2, 3} does not. With ``resume`` every group
continues its own run from its disk snapshots.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from keel import Guard, RecoveryConfig
from keel.guard import DistributedConfig


def train(run_dir: Path, group, resume: bool) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(nn.Linear(16, 4), process_group=group)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    try:
        guard = Guard(
            model,
            opt,
            run_dir=str(run_dir),
            policy="recover",
            resume=resume,
            recovery=RecoveryConfig(snapshot_every=2, disk_every=1),
            distributed=DistributedConfig(process_group=group),
        )
    except ValueError as exc:
        return {"error": str(exc)}
    start, actions = guard.global_step, []
    with guard:
        for step in range(start, 5 + start):
            torch.manual_seed(10 * step + rank)
            loss = F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4))
            loss.backward()
            if rank == 1 and step == 3:
                model.module.weight.grad[0, 0] = float("nan")
            actions.append(guard.step(loss).action)
            opt.zero_grad()
            guard.recovery.disk.wait()
    return {"start": start, "actions": actions}


def main() -> None:
    out, resume = Path(sys.argv[1]), sys.argv[2:] == ["resume"]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    result = train(out / "run", groups[rank // 2], resume)
    (out / f"rank{rank}{'-resumed' * resume}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
