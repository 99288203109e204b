"""One collective per healthy step: RankSync.to_host and a Guard under DDP, with rank 0 alone adding a key on one
step (the loop's ``if rank == 0:`` logging) between steps whose layouts every rank shares.

torchrun --nproc_per_node=2 tests/distributed/agreement_worker.py OUT_DIR
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
from keel.signals import PerParam, pack
from tests.distributed.test_sync import HostReads

ODD_STEP = 4  # the step on which rank 0 alone packs one more key


class Collectives:
    """Counts the calls RankSync makes to torch.distributed's collectives."""

    NAMES = ("all_reduce", "all_gather_object")

    def __enter__(self) -> Collectives:
        self.count, self._saved = 0, {name: getattr(dist, name) for name in self.NAMES}
        for name, original in self._saved.items():

            def counting(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counting)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def measured(rank: int, step: int) -> dict:
    t = torch.tensor
    values = {
        "loss": t(1.0 + rank + step),
        "grad/norm/": PerParam(("a", "b"), t([1.0, 2.0]) * (rank + 1)),
        "attn/max_logit": t(10.0 * rank + step),
    }
    if rank == 0 and step == ODD_STEP:
        values["tps"] = t(1234.0)
    return values


def synced(rank: int) -> dict:
    sync = RankSync(nn.Linear(1, 1), DistributedConfig(sharded=False))
    steps = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for step in range(8):
            late = {"update/norm": torch.tensor(2.0 * (rank + 1))} if step % 3 == 0 else {}  # a layout that alternates
            with Collectives() as collectives, HostReads() as reads:
                (values, per_param), (late_values, _) = sync.to_host(pack(measured(rank, step), late))
            steps.append(
                {
                    "values": values,
                    "per_param": per_param,
                    "late": late_values,
                    "collectives": collectives.count,
                    "reads": reads.count,
                }
            )
    return {"steps": steps}


def guarded(rank: int, out: Path) -> dict:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.Guard(model, opt, run_dir=out / "run", overwrite=True, policy="skip")
    actions, collectives = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for step in range(12):
                torch.manual_seed(100 * step + rank)
                loss = F.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4))
                loss.backward()
                if rank == 1 and step == 9:
                    model.module.weight.grad[0, 0] = float("nan")  # after DDP's all-reduce: rank 1's alone
                signals = {"perf/tokens_per_s": torch.tensor(1000.0)} if rank == 0 and step == ODD_STEP else None
                with Collectives() as counter:
                    actions.append(guard.step(loss, signals=signals).action)
                collectives.append(counter.count)
                opt.zero_grad()
        finally:
            guard.close()
    said = [(str(w.message), w.filename) for w in caught if issubclass(w.category, keel.KeelWarning)]
    return {
        "actions": actions,
        "collectives": collectives,
        "params": [p.detach().flatten().tolist() for p in model.parameters()],
        "warnings": said,
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[1])
    result = {"synced": synced(rank), "guarded": guarded(rank, out)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
