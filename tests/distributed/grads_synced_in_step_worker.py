"""nanochat's distributed-optimizer shape: no DDP wrapper; the optimizer averages the gradients inside its own
step(). keel.watch(policy="skip") on 2 gloo ranks; rank 1's loss is NaN at step 3. Rank 0 writes what keel found."""

import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

import keel


class AveragingSGD(torch.optim.Optimizer):
    """SGD that all-reduces each gradient in step(), as a distributed optimizer without DDP does."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                dist.all_reduce(p.grad)
                p.sub_(group["lr"] * p.grad / dist.get_world_size())


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = AveragingSGD(model.parameters())
    warnings.simplefilter("ignore")
    watch = keel.watch(model, optimizer, policy="skip")
    data = torch.Generator().manual_seed(rank)
    for step in range(8):
        loss = model(torch.randn(16, 8, generator=data)).pow(2).mean()
        if step == 3 and rank == 1:
            loss = loss * float("nan")
        loss.backward()
        optimizer.step()
        model.zero_grad()
    watch.close()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    both = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    if rank == 0:
        result = {
            "rank_outliers": [[f.step, f.evidence["rule"]] for f in watch.findings if f.kind == "rank_outlier"],
            "decisions": [[d.step, d.action] for d in watch.decisions],
            "ranks_agree": torch.equal(both[0], both[1]),
            "finite": bool(flat.isfinite().all()),
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
