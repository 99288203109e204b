"""One rank of a 2-rank DDP job (gloo, CPU) in which only rank 1's batch holds poisoned examples; writes JSON.

    torchrun --nproc_per_node=2 tests/distributed/attribution_worker.py OUT_DIR POISON

Each rank trains on its own ids (rank·10000 + step·8 + j). At step 150, rank 1's batch carries two examples whose
targets are POISON times too large; rank 0's batch is clean. The worker records every rank's decisions, whether
the ranks' parameters are still equal at the end, and rank 0's skip list. Then a second run under ``recover`` in
which rank 1's loss turns NaN for three steps in a row: the rollback's window must list both ranks' ids.
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

import keel
from keel.data import SkipList

STEPS, POISON_STEP, BATCH = 170, 150, 8


def example_losses(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y, reduction="none").mean(1)


def main() -> None:
    out, poison = Path(sys.argv[1]), float(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {"rank": rank, **poisoned_run(out / "run", rank, poison), **rollback_run(out / "rollback", rank)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # no rank tears the group down while another still gathers
    dist.destroy_process_group()


def poisoned_run(run_dir: Path, rank: int, poison: float) -> dict:
    torch.manual_seed(0)
    model = DDP(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = keel.Guard(
        model,
        opt,
        run_dir=str(run_dir),
        policy="skip",
        attribution=keel.Attribution(loss_fn=example_losses, top_k=4),
    )
    g = torch.Generator().manual_seed(100 + rank)
    w = torch.randn(4, 2, generator=torch.Generator().manual_seed(7))
    poisoned: list[int] = []
    for step in range(STEPS):
        ids = [rank * 10000 + step * BATCH + j for j in range(BATCH)]
        x = torch.randn(BATCH, 4, generator=g)
        y = x @ w + 0.05 * torch.randn(BATCH, 2, generator=g)
        if rank == 1 and step == POISON_STEP:
            y[2] *= poison
            y[5] *= poison
            poisoned = [ids[2], ids[5]]
        batch = (x, y)
        loss = example_losses(model, batch).mean()
        loss.backward()
        guard.step(loss, batch_ids=ids, batch=batch)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return {
        "poisoned": poisoned,
        "decisions": [(d.step, d.action) for d in guard.decisions if d.action != "ok"],
        "findings": sorted({(f.step, f.kind) for f in guard.findings}),
        "params_equal": _params_equal(model),
        "skip_listed": _skip_listed(run_dir, rank),
    }


def rollback_run(run_dir: Path, rank: int) -> dict:
    torch.manual_seed(0)
    model = DDP(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = keel.Guard(
        model,
        opt,
        run_dir=str(run_dir),
        policy="recover",
        max_consecutive_skips=2,
        recovery=keel.RecoveryConfig(snapshot_every=5),
    )
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(40):
        ids = [rank * 10000 + step * BATCH + j for j in range(BATCH)]
        x, y = torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 2, generator=g)
        if rank == 1 and step in (30, 31, 32):
            y[0] = float("nan")
        loss = example_losses(model, (x, y)).mean()
        loss.backward()
        guard.step(loss, batch_ids=ids)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return {
        "rollback_decisions": [(d.step, d.action, d.restored_step) for d in guard.decisions if d.action != "ok"],
        "rollback_params_equal": _params_equal(model),
        "rollback_skip_listed": _skip_listed(run_dir, rank),
    }


def _params_equal(model: nn.Module) -> bool:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _skip_listed(run_dir: Path, rank: int) -> list[int]:
    entries = SkipList(run_dir).entries if rank == 0 and (run_dir / "skip_list.json").exists() else []
    return sorted({i for e in entries for i in e.ids})


if __name__ == "__main__":
    main()
