"""Write switch_router_unlocking.json: a tiny Hugging Face Switch Transformers (router locked by its std-1.0 init)
trained under keel.stabilize's router_z_loss + load_balancing, as the router probe measured it.

Run from the repository root: ``OMP_NUM_THREADS=1 .venv/bin/python tests/detect/data/record_switch_unlocking.py``
(transformers 5.25; ~1 min on one CPU thread). Python-source bytes (the standard library's json package) as data.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import torch
import transformers

import keel
from keel._core import keys
from keel.detect import default_detectors
from keel.guard import Guard


class Capture:
    """Keeps the worst router's imbalance and the lowest router's gate entropy of each step."""

    name = "capture"
    reads = (keys.LOSS,)

    def __init__(self) -> None:
        self.rows: list[tuple[float, float]] = []

    def update(self, obs):
        v = obs.values
        self.rows.append((v.get(keys.MOE_LOAD_IMBALANCE, math.nan), v.get(keys.MOE_GATE_ENTROPY, math.nan)))
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def main() -> None:
    torch.set_num_threads(1)
    text = b"".join(Path(p).read_bytes() for p in sorted(glob.glob("/usr/lib/python3*/json/*.py"))[:6])
    data = torch.tensor([c % 96 + 3 for c in text])
    generator = torch.Generator().manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4,
        expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1, router_jitter_noise=0.0,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).train()
    keel.stabilize(model, ["router_z_loss", "load_balancing"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    capture = Capture()
    with Guard(model, opt, log_every=1, detectors=[*default_detectors(), capture]) as guard:
        for _ in range(150):
            starts = torch.randint(0, len(data) - 65, (8,), generator=generator)
            x = torch.stack([data[s : s + 32] for s in starts])
            y = torch.stack([data[s + 32 : s + 64] for s in starts])
            loss = model(input_ids=x, labels=y).loss
            loss.backward()
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
    out = {
        "source": "tests/detect/data/record_switch_unlocking.py: HF Switch Transformers (d_model 32, 4 experts top-1, "
        "2+2 MoE layers, HF's router init std 1.0) under keel.stabilize(['router_z_loss', 'load_balancing']), "
        "AdamW 1e-3, 150 steps, seed 0: moe/load_imbalance (worst router), moe/gate_entropy (lowest) per step",
        "experts": 4,
        "top_k": 1,
        "imbalance": [round(i, 4) for i, _ in capture.rows],
        "gate_entropy": [round(e, 4) for _, e in capture.rows],
    }
    (Path(__file__).parent / "switch_router_unlocking.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
