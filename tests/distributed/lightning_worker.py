"""One rank of a Lightning DDP run under torchrun (CPU, gloo) with KeelCallback; a NaN in rank 1's gradient at
step 4. Writes each rank's actions and parameters as JSON.

    torchrun --nproc_per_node=2 tests/distributed/lightning_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from keel.integrations.lightning import KeelCallback
from tests.integrations.test_lightning import Regression


class NaNOnRank1(Regression):
    def on_before_optimizer_step(self, optimizer):
        if self.trainer.global_step == 4 and self.global_rank == 1:
            self.net[0].weight.grad[0, 0] = float("nan")  # after DDP's all-reduce: only rank 1 has it


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    module = NaNOnRank1()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * 2 * 12, 8, generator=g)
    data = DataLoader(TensorDataset(x, torch.tanh(x[:, :4])), batch_size=16)  # Lightning adds the sampler
    keel = KeelCallback(run_dir=str(out / "run"), policy="skip")
    trainer = L.Trainer(
        max_steps=10,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[keel],
    )
    trainer.fit(module, data)
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "actions": [(d.step, d.action) for d in keel.guard.decisions],
                "steps": keel.guard.global_step,
                "params": [p.detach().flatten().tolist() for p in module.parameters()],
                "distributed": keel.guard.dist.describe() if keel.guard.dist else None,
                "named": [f.evidence.get("rank") for f in keel.guard.findings if f.kind == "rank_outlier"],
            }
        )
    )


if __name__ == "__main__":
    main()
