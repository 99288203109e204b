"""Two ranks pack different layouts — the loop's own signals on one rank only — through RankSync and a Guard;
then a Guard inside DDP's ``model.join()`` with uneven inputs.

torchrun --nproc_per_node=2 tests/distributed/layout_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import keel
from keel.guard.distributed import DistributedConfig, RankSync
from keel.signals import PerParam, pack, unpack
from tests.distributed.agreement_worker import Collectives


def measurements(rank: int) -> dict:
    t = torch.tensor
    shared = {"loss": t(1.0 + rank), "grad/norm/": PerParam(("a", "b"), t([1.0, 2.0]) * (rank + 1))}
    if rank == 0:  # a scalar and a family only rank 0 has, and the shared keys in another order
        own = PerParam(("x",), t([7.0]))
        return {"tps": t(1234.0), "grad/norm/": shared["grad/norm/"], "own/": own, "loss": shared["loss"]}
    return {**shared, "attn/max_logit": t(5.0)}  # a max only rank 1 has


def reduced(rank: int) -> dict:
    sync = RankSync(nn.Linear(1, 1), DistributedConfig(sharded=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = unpack(sync.reduce(pack(measurements(rank), {"update/norm": torch.tensor(2.0 * (rank + 1))})))
        again = unpack(sync.reduce(pack(measurements(rank), {})))
    (values, per_param), (late, _) = first
    healthy, collectives = [], []
    for step in range(3):  # every rank packs the same keys: after the first step, one collective per step
        with Collectives() as calls:
            healthy.append(sync.to_host(pack({"loss": torch.tensor(1.0 + rank + step)}, {}))[0][0]["loss"])
        collectives.append(calls.count)
    return {
        "healthy": healthy,
        "healthy_collectives": collectives,
        "values": values,
        "per_param": per_param,
        "late": late,
        "again": again[0][0],
        "warnings": [str(w.message) for w in caught if issubclass(w.category, keel.KeelWarning)],
    }


def guarded(rank: int, out: Path) -> dict:
    """V1 of session 13: signals= on rank 0 only killed both ranks at step 0 (gloo size mismatch)."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.Guard(model, opt, run_dir=out / "run", overwrite=True, policy="skip")
    actions = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for step in range(6):
            torch.manual_seed(100 * step + rank)
            loss = F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4))
            loss.backward()
            signals = {"perf/tokens_per_s": torch.tensor(1000.0 + step)} if rank == 0 else None
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9) if rank == 0 and step % 2 else None
            actions.append(guard.step(loss, signals=signals, grad_norm=norm).action)
            opt.zero_grad()
    guard.close()
    return {"actions": actions, "params": [p.detach().flatten().tolist() for p in model.parameters()]}


def uneven(rank: int, out: Path) -> dict:
    """V8 of session 13: rank 0 has 4 batches, rank 1 has 6; keel's collective killed both once rank 0 joined."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.Guard(model, opt, run_dir=out / "uneven", overwrite=True)
    with warnings.catch_warnings(record=True) as caught, model.join():
        warnings.simplefilter("always")
        for _ in range(4 if rank == 0 else 6):
            F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4)).backward()
            guard.step(torch.tensor(0.0) + 1)
            opt.zero_grad()
    guard.close()
    said = [str(w.message) for w in caught if issubclass(w.category, keel.KeelWarning)]
    return {"steps": guard.global_step, "warnings": said}


def fsdp_clipped(rank: int) -> list:
    """V19 of session 13: the loop's clip_grad_norm_ over FSDP2 parameters returns a DTensor; passed as grad_norm=
    it made every guard.step fail, and a NaN gradient went into the weights."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.Guard(model, opt, policy="skip")
    actions = []
    for step in range(6):
        torch.manual_seed(10 * step + rank)
        x = torch.randn(8, 16)
        loss = F.mse_loss(model(x), x[:, :4])
        loss.backward()
        if rank == 1 and step == 3:
            model[0].weight.grad.to_local()[0, 0] = float("nan")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        actions.append(guard.step(loss, grad_norm=norm).action)
        opt.zero_grad()
    guard.close()
    return actions


def main() -> None:
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[1])
    result = {"reduced": reduced(rank), "guarded": guarded(rank, out), "uneven": uneven(rank, out)}
    result["fsdp_clipped"] = fsdp_clipped(rank)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
