"""One rank of a 2-rank DDP job (gloo, CPU) that claims one run_dir several times; writes what happened as JSON.

    torchrun --nproc_per_node=2 tests/distributed/run_dir_worker.py OUT_DIR

1. a run with disk snapshots per rank, closed; 2. rank 0's part of the folder emptied, so only rank 1 holds an
earlier run: a new Guard must be refused on every rank (not on rank 1 alone, which would leave rank 0 waiting in
the first all-reduce); 3. ``overwrite=True`` starts a new run; 4. ``resume=True`` continues it on both ranks, with
the run id rank 0 read from the store.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from keel import Guard, RecoveryConfig

STARTS: list[int] = []  # the step each train() began at (after a resume: the snapshot's)


def train(run_dir: Path, steps: int, **kwargs) -> Guard:
    torch.manual_seed(0)
    model = DDP(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(
        model,
        opt,
        run_dir=str(run_dir),
        policy="recover",
        recovery=RecoveryConfig(snapshot_every=2, disk_every=1, keep_on_disk=2),
        **kwargs,
    )
    g = torch.Generator().manual_seed(dist.get_rank())
    STARTS.append(guard.global_step)
    for _ in range(guard.global_step, steps):
        loss = F.mse_loss(model(torch.randn(8, 4, generator=g)), torch.randn(8, 2, generator=g))
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        guard.recovery.disk.wait()
    guard.close()
    return guard


def main() -> None:
    out = Path(sys.argv[1])
    run_dir = out / "run"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict = {"rank": rank}
    train(run_dir, 6)
    dist.barrier()
    if rank == 0:
        for name in ("run.sqlite", "run.sqlite-wal", "run.sqlite-shm"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "rank-0" / "snapshots")
    dist.barrier()
    try:
        train(run_dir, 6)
        result["refused"] = None
    except ValueError as exc:
        result["refused"] = str(exc)
    dist.barrier()
    result["new_run_id"] = train(run_dir, 4, overwrite=True).run_dir.run_id
    dist.barrier()
    resumed = train(run_dir, 8, resume=True)
    result["resumed_run_id"] = resumed.run_dir.run_id
    result["resumed_steps"] = resumed.global_step
    result["snapshots"] = sorted(p.name for p in (run_dir / f"rank-{rank}" / "snapshots").iterdir())
    dist.barrier()
    if rank == 1:  # the job stopped while rank 1 was still writing step 8: its folder is a temporary one
        folder = run_dir / "rank-1" / "snapshots" / "step-000000008"
        folder.rename(folder.with_name(".tmp-step-000000008"))
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(run_dir, 10, resume=True)
    result["cut_resumed_from"] = STARTS[-1]
    result["cut_warnings"] = [str(w.message) for w in caught if "not every rank does" in str(w.message)]
    dist.barrier()
    if rank == 1:  # rank 1's newest snapshot (step 10) is damaged on disk: a flipped byte in its tensors
        tensors = run_dir / "rank-1" / "snapshots" / "step-000000010" / "tensors.safetensors"
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(run_dir, 12, resume=True)
    result["corrupt_resumed_from"] = STARTS[-1]
    result["corrupt_warnings"] = [str(w.message) for w in caught if "another rank could not" in str(w.message)]
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
