"""One rank of a 2-rank gloo DDP job whose rank 1 is late for keel's collective by more than the process group's
timeout: it sleeps between its backward and ``guard.step`` at step LATE_AT (a rank-0-only eval, a checkpoint written
from one rank, a stuck file system), the others wait in keel's collective until the timeout. BACKEND ``gloo``, or
``cpu:gloo`` (a backend string other than "gloo": keel's layout checks then go through its gloo twin of the world, as
for NCCL; at step 0 keel checks the layout there). Writes what each rank saw.

    torchrun --nproc_per_node=2 tests/distributed/hung_worker.py OUT TIMEOUT_S LATE_S LATE_AT BACKEND

``rank<r>.json``: the keel components that raised (its keel_error findings), the KeelWarnings, the seconds each
``guard.step`` took, the loop's own error (the DDP backward after the broken collective), and the run's status.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from keel import Guard
from keel._core.errors import KeelWarning


def main() -> None:
    out, timeout, late, late_at, backend = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), *sys.argv[4:6]
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = Guard(model, opt, run_dir=str(out / "run"), policy="recover")
    step_seconds: list[float] = []
    loop_error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KeelWarning)
        try:
            for i in range(6):
                g = torch.Generator().manual_seed(1000 * rank + i)
                x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
                loss = F.mse_loss(model(x), y)
                loss.backward()
                if rank == 1 and i == int(late_at):
                    (out / "late").touch()  # for a test that signals the job while the others wait
                    time.sleep(late)
                start = time.perf_counter()
                guard.step(loss)
                step_seconds.append(round(time.perf_counter() - start, 2))
                opt.zero_grad()
        except RuntimeError as exc:  # the loop's own collective on the broken group
            loop_error = str(exc)[:200]
        finally:
            guard.close()
    result = {
        "failed": [[f.signal, f.evidence["error"]] for f in guard.findings if f.kind == "keel_error"],
        "warnings": [str(w.message) for w in caught if issubclass(w.category, KeelWarning)],
        "step_seconds": step_seconds,
        "loop_error": loop_error,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
