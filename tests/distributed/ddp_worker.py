"""One rank of a DDP run under torchrun (gloo, CPU), with a fault injected on one rank; writes its results as JSON.

    torchrun --nproc_per_node=2 tests/distributed/ddp_worker.py SCENARIO OUT_DIR

Scenarios: ``observe`` (200 healthy steps; also trains a bare DDP copy to compare), ``nan_grad`` (a NaN in
rank 1's gradient at step 12, policy skip), ``nan_param`` (a NaN written into rank 1's weights at step 23,
policy recover), ``bad_shard`` (rank 1's targets corrupted from step 40), ``bad_shard_from_start`` (the last
rank's targets corrupted from the first step; run with three ranks). ``fsdp_<name>`` runs the same under
FSDP2 ``fully_shard``.
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
from tests.distributed.test_sync import HostReads


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def batches(rank: int, steps: int, corrupt_from: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A regression task with a fixed teacher; each rank draws its own shard. A corrupt shard has wrong targets."""
    teacher = torch.Generator().manual_seed(1234)
    w = torch.randn(8, 4, generator=teacher)
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=g)
        y = torch.tanh(x @ w) + 0.05 * torch.randn(32, 4, generator=g)
        if corrupt_from is not None and step >= corrupt_from:
            y = 3.0 * torch.randn(32, 4, generator=g)  # labels from nowhere: the shard went bad
        out.append((x, y))
    return out


def wrap(net: nn.Module, fsdp: bool) -> nn.Module:
    if not fsdp:
        return DDP(net)
    from torch.distributed.fsdp import fully_shard

    fully_shard(net.fc1)
    fully_shard(net.fc2)
    return fully_shard(net)


def train(scenario: str, rank: int, world: int, run_dir: str | None, *, keel_on: bool = True) -> dict:
    fsdp = scenario.startswith("fsdp_")
    scenario = scenario.removeprefix("fsdp_")
    torch.manual_seed(0)
    model = wrap(Net(), fsdp)
    net = model if fsdp else model.module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
    policy = {"observe": "observe", "nan_grad": "skip", "nan_param": "recover"}.get(scenario, "observe")
    guard = (
        Guard(
            model,
            opt,
            sched,
            policy=policy,
            run_dir=run_dir,
            max_consecutive_skips=3,
            recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1, disk_every=2),
        )
        if keel_on
        else None
    )
    steps = {"bad_shard": 90, "bad_shard_from_start": 90, "observe": 200}.get(scenario, 40)
    corrupt_from = {
        "bad_shard": 40 if rank == 1 else None,
        "bad_shard_from_start": 0 if rank == world - 1 else None,
    }.get(scenario)
    actions: list[str] = []
    host_reads: list[int] = []
    for step, (x, y) in enumerate(batches(rank, steps, corrupt_from)):
        if scenario == "nan_param" and step == 23 and rank == 1:
            with torch.no_grad():
                local(net.fc1.weight)[0, 0] = float("nan")  # a bit flip in one worker's memory
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if scenario == "nan_grad" and step == 12 and rank == 1:
            local(net.fc1.weight.grad)[0, 0] = float("nan")  # after the all-reduce: only rank 1 sees it
        if guard is not None:
            with HostReads() as counter:
                actions.append(guard.step(loss).action)
            host_reads.append(counter.count)
        else:
            with HostReads() as counter:
                opt.step()
                sched.step()
            host_reads.append(counter.count)
        opt.zero_grad(set_to_none=True)
    result = {
        "rank": rank,
        "actions": actions,
        "params": [full(p).flatten().tolist() for p in model.parameters()],
        "opt_steps": [int(s["step"]) for s in opt.state_dict()["state"].values()],
        "last_lr": sched.get_last_lr(),
        "host_reads": host_reads,
    }
    if guard is not None:
        guard.close()
        result["findings"] = [
            {
                "step": f.step,
                "kind": f.kind,
                "severity": f.severity,
                "signal": f.signal,
                "evidence": {k: v for k, v in f.evidence.items() if k in ("rank", "ranks", "rule", "feature")},
            }
            for f in guard.findings
        ]
        result["restored"] = [d.restored_step for d in guard.decisions if d.action == "rollback"]
    return result


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter or gradient; a DDP one as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().full_tensor() if hasattr(t, "full_tensor") else t.detach()


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = train(scenario, rank, world, str(out_dir / "run"))
    if scenario == "observe":
        bare = train(scenario, rank, world, None, keel_on=False)
        result["bare_params"], result["bare_host_reads"] = bare["params"], bare["host_reads"]
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
