"""Two ranks reduce crafted measurements with RankSync (replicated and sharded); rank 0 writes what came back.

torchrun --nproc_per_node=2 tests/distributed/reduce_worker.py OUT_JSON
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.distributed as dist
from torch import nn

from keel.guard.distributed import DistributedConfig, RankSync
from keel.signals import PerParam, pack, unpack


def measurements(rank: int) -> dict:
    t = torch.tensor
    return {
        "loss": t(1.0 + rank),  # mean → 1.5
        "grad/norm": t(3.0 if rank == 0 else 4.0),  # replicated: mean 3.5; sharded: √(9+16) = 5
        "grad/norm/": PerParam(("a", "b"), t([1.0, 2.0]) * (rank + 1)),
        "attn/max_logit": t(10.0 * (rank + 1)),  # max → 20
        "logits/log_z_min": t(-1.0 * (rank + 1)),  # min → -2
        "act/rms": t(math.nan if rank == 1 else 1.0),  # NaN on one rank reaches every rank
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    for sharded in (False, True):
        sync = RankSync(nn.Linear(1, 1), DistributedConfig(sharded=sharded))
        late = {"update/norm": torch.tensor(2.0)}
        (values, per_param), (late_values, _) = unpack(sync.reduce(pack(measurements(rank), late)))
        out[str(sharded)] = {"values": values, "per_param": per_param, "late": late_values}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
