"""A Guard inside DDP's join context (DDP's Join tutorial wraps the whole loop in ``with model.join():``).

torchrun --nproc_per_node=2 tests/distributed/join_worker.py OUT_DIR

Scenarios, each rank writing its actions and weight checksums as JSON:
- ``even``: every rank has 8 batches inside ``model.join()``; rank 1's gradient gets a NaN at step 3, after DDP's
  all-reduce (only rank 1 sees it): keel still agrees across ranks, so both skip step 3.
- ``uneven``: rank 0 has 4 batches, rank 1 has 7, policy "recover" (whose weights check after each update is a
  collective too); a NaN on rank 1 at step 2, before rank 0 runs out, is skipped by both; rank 1 goes on alone.
- ``generic``: ``torch.distributed.algorithms.join.Join([model])`` (the generic context manager) with even batches.
- ``again``: two joins in a row, then a step outside any join: keel agrees in each; a deep copy of the model gets
  DDP's own join hook.
- ``retried``: a Guard refused at construction, then one made again: the second's join agrees, no hang.
- ``inside``: the Guard made inside the join (its hook is not in that join), uneven batches: no hang; told why.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.join import Join

import keel
from keel.store import RunReader


def checksum(model: nn.Module) -> str:
    return hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:12]


def train(rank: int, out: Path, batches: int, policy: str = "skip", generic: bool = False) -> dict:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.Guard(model, opt, run_dir=out / f"run-{policy}-{batches}", overwrite=True, policy=policy)
    actions, sums = [], []
    with warnings.catch_warnings(record=True) as caught, Join([model]) if generic else model.join():
        warnings.simplefilter("always")
        for step in range(batches):
            torch.manual_seed(100 * step + rank)
            loss = F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4))
            loss.backward()
            if rank == 1 and step == (2 if policy == "recover" else 3):
                model.module.weight.grad[0, 0] = float("nan")
            actions.append(guard.step(loss).action)
            sums.append(checksum(model))
            opt.zero_grad()
    guard.close()
    said = [str(w.message) for w in caught if issubclass(w.category, keel.KeelWarning)]
    return {"actions": actions, "sums": sums, "final": checksum(model), "warnings": said}


def again(rank: int, out: Path) -> dict:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    actions = []
    with keel.Guard(model, opt, run_dir=out / "again", overwrite=True, policy="skip") as guard:
        twin = copy.deepcopy(model)  # an EMA copy, the timm way: it must not carry keel's hook into its joins
        twins_hook = vars(twin).get("join_hook")
        for epoch in range(2):
            with model.join():
                for step in range(3):
                    torch.manual_seed(10 * epoch + step + rank)
                    loss = F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4))
                    loss.backward()
                    if rank == 1 and step == epoch + 1:
                        model.module.weight.grad[0, 0] = float("nan")
                    actions.append(guard.step(loss).action)
                    opt.zero_grad()
        loss = F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4))
        loss.backward()
        if rank == 1:
            model.module.weight.grad[0, 0] = float("inf")
        actions.append(guard.step(loss).action)
    return {
        "actions": actions,
        "final": checksum(model),
        "hook_left": "join_hook" in vars(model),
        "twins_hook_is_ddps": twins_hook is None or getattr(twins_hook, "__self__", None) is twin,
    }


def inside(rank: int, out: Path) -> dict:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught, model.join():
        warnings.simplefilter("always")
        with keel.Guard(model, opt, run_dir=out / "inside", overwrite=True) as guard:
            for _ in range(3 if rank == 0 else 5):
                F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4)).backward()
                guard.step(torch.tensor(1.0))
                opt.zero_grad()
    said = [str(w.message) for w in caught if issubclass(w.category, keel.KeelWarning)]
    return {"steps": guard.global_step, "warnings": said}


def retried(rank: int, out: Path) -> dict:
    """A Guard refused at construction (its run_dir in use), then one made again: only the second shadows."""
    torch.manual_seed(0)
    held_model = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    holder = keel.Guard(held_model, torch.optim.SGD(held_model.parameters(), lr=0.1), run_dir=out / "held")
    model = nn.parallel.DistributedDataParallel(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        keel.Guard(model, opt, run_dir=out / "held", policy="skip")
        refused = False
    except ValueError:
        refused = True
    holder.close()
    actions = []
    with keel.Guard(model, opt, run_dir=out / "retried", policy="skip") as guard, model.join():
        for step in range(4 if rank == 0 else 6):
            torch.manual_seed(100 * step + rank)
            loss = F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4))
            loss.backward()
            if rank == 1 and step == 2:
                model.module.weight.grad[0, 0] = float("nan")
            actions.append(guard.step(loss).action)
            opt.zero_grad()
    return {
        "refused": refused,
        "actions": actions,
        "hook_left": "join_hook" in vars(model),
        "rank_stats": guard.dist.describe()["rank_stats"],  # keel's comm hook, left by the refused Guard, taken over
        "cos_steps": _steps_of(out / "retried", "rank/grad/cos/1") if rank == 0 else None,
    }


def _steps_of(run_dir: Path, key: str) -> list[int]:
    with RunReader(run_dir) as store:
        return store.signal(key)[0].tolist()


def main() -> None:
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[1])
    result = {
        "even": train(rank, out, 8),
        "uneven": train(rank, out, 4 if rank == 0 else 7, policy="recover"),
        "generic": train(rank, out, 6, generic=True),
        "again": again(rank, out),
        "inside": inside(rank, out),
        "retried": retried(rank, out),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
