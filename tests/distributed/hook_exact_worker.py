"""One rank of a 3-rank DDP job (gloo, CPU): the gradients DDP averages with keel's communication hook on (a Guard)
against DDP's own reducer (no Guard), bit for bit; writes ``rank<r>.json``.

    torchrun --nproc_per_node=3 tests/distributed/hook_exact_worker.py OUT_DIR
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

from keel import Guard


def gradients(with_guard: bool, rank: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, policy="observe") if with_guard else None
    try:
        g = torch.Generator().manual_seed(rank)
        F.mse_loss(model(torch.randn(16, 8, generator=g)), torch.randn(16, 2, generator=g)).backward()
        return [p.grad.clone() for p in model.parameters()]
    finally:
        if guard is not None:
            guard.close()


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    own, keels = gradients(False, rank), gradients(True, rank)
    result = {"equal": [torch.equal(a, b) for a, b in zip(own, keels, strict=True)]}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
