"""One rank of a Hugging Face Trainer run under torchrun (CPU, gloo) with KeelCallback; a NaN in rank 1's
gradient at step 3. Writes each rank's actions and parameters as JSON.

    torchrun --nproc_per_node=2 tests/distributed/hf_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from keel.integrations.hf import KeelCallback
from tests.integrations.test_hf import train


class NaNOnRank1(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 3 and dist.get_rank() == 1:
            model.transformer.h[1].attn.c_attn.weight.grad[0, 0] = float("nan")  # only rank 1 sees it


def main() -> None:
    out = Path(sys.argv[1])
    keel = KeelCallback(run_dir=str(out / "run"), policy="skip")
    trainer = train(out, [NaNOnRank1(), keel], steps=6, accumulate=1, ddp_backend="gloo")
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "actions": [(d.step, d.action) for d in keel.guard.decisions],
                "steps": keel.guard.global_step,
                "world": trainer.args.world_size,
                "params": [float(p.detach().double().sum()) for p in trainer.model.parameters()],
                "named": [f.evidence.get("rank") for f in keel.guard.findings if f.kind == "rank_outlier"],
            }
        )
    )


if __name__ == "__main__":
    main()
