"""Record the router signals of real keel-proxy MoE runs for the MoE detector tests (test_moe_detectors.py).

Run: ``.venv/bin/python tests/detect/data/record_moe_series.py`` (a few minutes on 2 CPU cores). Writes
``moe_series.json``: per run, the per-step series of the signals the router probe emits (keys.MOE_*, 4 significant
digits), computed here from the proxy's router logits as `keel.signals.router` defines them, so the tests do not
depend on the probe's code; ``per_router`` holds the per-router imbalance and dead count.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from keel._core import keys
from keel.proxy import MoeConfig, MoeMLP, ProxyBatches, create_proxy_model

RUNS = {
    # name: (lr, MoeConfig fields)
    "no_aux": (1e-3, dict(num_experts=4, top_k=2, aux_loss=0.0)),
    "high_lr": (3e-2, dict(num_experts=4, top_k=2, aux_loss=1e-2)),
    "healthy_aux": (1e-3, dict(num_experts=4, top_k=2, aux_loss=1e-2)),
    "no_aux_top1_e8": (1e-3, dict(num_experts=8, top_k=1, aux_loss=0.0)),
    "healthy_top1_e8": (1e-3, dict(num_experts=8, top_k=1, aux_loss=1e-2)),
}
STEPS, WARMUP = 300, 20


def _taps(model):
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoeMLP):
            module.gate.register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, (o[0], o[2], m)))
    return out


def _signals(taps) -> dict[str, float]:
    per = {k: {} for k in ("max", "z", "ent", "imb", "cv", "dead")}
    for name, (logits, idx, _gate) in taps.items():
        logits = logits.detach().float()
        e = logits.shape[-1]
        lse = logits.logsumexp(-1)
        p = logits.softmax(-1)
        counts = torch.bincount(idx.reshape(-1), minlength=e).float()
        per["max"][name] = logits.max().item()
        per["z"][name] = (lse**2).mean().item()
        per["ent"][name] = (-(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(e)).item()
        per["imb"][name] = (counts.max() / counts.mean()).item()
        per["cv"][name] = (counts.std(unbiased=False) / counts.mean()).item()
        per["dead"][name] = float((counts == 0).sum().item())
    return {
        keys.MOE_ROUTER_MAX_LOGIT: max(per["max"].values()),
        keys.MOE_ROUTER_Z: max(per["z"].values()),
        keys.MOE_GATE_ENTROPY: min(per["ent"].values()),
        keys.MOE_LOAD_IMBALANCE: max(per["imb"].values()),
        keys.MOE_LOAD_CV: max(per["cv"].values()),
        keys.MOE_DEAD_EXPERTS: sum(per["dead"].values()),
        "per_layer_imbalance": per["imb"],
        "per_layer_dead": per["dead"],
    }


def record(name: str, lr: float, moe: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = create_proxy_model("small", moe=MoeConfig(**moe))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = ProxyBatches(batch_size=16, seq_len=64, seed=seed)
    taps = _taps(model)
    steps = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / WARMUP)
        x, y = batches.next()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        extra = [m.loss for m in model.modules() if isinstance(m, MoeMLP) and m.loss is not None]
        total = loss + sum(extra) if extra else loss
        opt.zero_grad()
        total.backward()
        opt.step()
        steps.append({"step": step, "loss": loss.item(), **_signals(taps)})
    print(name, f"loss {steps[0]['loss']:.2f}->{steps[-1]['loss']:.2f}", file=sys.stderr)
    return compact({"lr": lr, "moe": moe, "seed": seed, "steps": steps})


def compact(run: dict) -> dict:
    """A run's steps as one rounded series per key (the file stays small)."""
    steps = run.pop("steps")
    out = {**run, "series": {}, "per_router": {}}
    for key in [k for k in steps[0] if k != "step" and not k.startswith("per_layer")]:
        out["series"][key] = [float(f"{s[key]:.4g}") for s in steps]
    for key, family in (
        ("per_layer_imbalance", keys.MOE_LOAD_IMBALANCE_PER_LAYER),
        ("per_layer_dead", keys.MOE_DEAD_EXPERTS_PER_LAYER),
    ):
        out["per_router"][family] = {r: [float(f"{s[key][r]:.4g}") for s in steps] for r in steps[0][key]}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    only = sys.argv[1:] or list(RUNS)
    path = Path(__file__).with_name("moe_series.json")
    data = json.loads(path.read_text()) if path.exists() else {}
    for name in only:
        lr, moe = RUNS[name]
        data[name] = record(name, lr, moe)
        path.write_text(json.dumps(data, separators=(",", ":")))  # after each run: a long recording keeps its runs
