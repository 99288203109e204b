"""`keel bench running-stats`: what keeping BatchNorm's running statistics across a skipped update costs.

Under ``skip`` and ``recover`` a `Guard` copies the running statistics of a model's BatchNorm/InstanceNorm layers
after each applied update and puts them back after a skipped one (`keel.recover.running_stats`). Two figures:

- the copy alone (`RunningStats.save`, and `restore`) on ResNet-50's BatchNorm layout (53 layers, 26,560 channels:
  running mean, variance and batch count of each), median over repeats;
- a small CIFAR-style CNN (BatchNorm after every convolution, SGD with Nesterov momentum) trained under
  ``Guard(policy="skip")`` with the statistics kept and with them switched off, blocks alternating in one process,
  the ratio of process CPU time per block (not wall time: the machine may be shared), median over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from torch import nn

from keel._core.argtypes import positive_int
from keel.recover.running_stats import RunningStats

# ResNet-50's BatchNorm layers in forward order: the stem, then each bottleneck's three (and a downsample's)
RESNET50_BN = [64] + [
    c
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3))
    for block in range(blocks)
    for c in (width, width, 4 * width, *((4 * width,) if block == 0 else ()))
]


def copy_costs(repeats: int) -> dict[str, Any]:
    """µs per `save` and per `restore` of ResNet-50's BatchNorm statistics on the CPU (median of ``repeats``)."""
    model = nn.Sequential(*[nn.BatchNorm2d(c) for c in RESNET50_BN])
    stats = RunningStats.of(model)
    assert stats is not None
    out: dict[str, Any] = {"layers": len(RESNET50_BN), "values": sum(t.numel() for t in stats.live())}
    for name, fn in (("save_us", stats.save), ("restore_us", stats.restore)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(100):
                fn()
            times.append((time.perf_counter() - start) / 100 * 1e6)
        out[name] = round(statistics.median(times), 1)
    return out


def _cnn() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)


def step_ratio(repeats: int, steps: int) -> dict[str, Any]:
    """CPU time per step of the CNN under skip, statistics kept / switched off (median ratio of alternating blocks)."""
    from keel.guard import Guard
    from keel.guard.console import silenced

    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    arms = {}
    with silenced():
        for name in ("kept", "off"):
            model, opt = _cnn()
            guard = Guard(model, opt, policy="skip", run_dir=None)
            if name == "off":
                guard._running_stats = None
            arms[name] = (guard, model, opt)

        def block(name: str) -> float:
            guard, model, opt = arms[name]
            start = time.process_time()
            for _ in range(steps):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                guard.step(loss)
                opt.zero_grad(set_to_none=True)
            return (time.process_time() - start) / steps

        for name in arms:
            block(name)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(repeats):
            for name in ("kept", "off") if r % 2 else ("off", "kept"):
                times[name].append(block(name))
        for guard, _, _ in arms.values():
            guard.close()
    ratios = [a / b for a, b in zip(times["kept"], times["off"], strict=True)]
    return {
        "step_ms_off": round(statistics.median(times["off"]) * 1e3, 2),
        "step_ms_kept": round(statistics.median(times["kept"]) * 1e3, 2),
        "ratio": round(statistics.median(ratios), 4),
        "ratios": [round(r, 4) for r in ratios],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=positive_int, default=15, help="timed repeats of each figure (default: 15)")
    parser.add_argument("--steps", type=positive_int, default=20, help="CNN steps per timed block (default: 20)")
    parser.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    result = {"copy": copy_costs(args.repeats), "cnn_skip_step": step_ratio(args.repeats, args.steps)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    copy, step = result["copy"], result["cnn_skip_step"]
    print(
        f"ResNet-50's BatchNorm statistics ({copy['layers']} layers, {copy['values']} values): save "
        f"{copy['save_us']} us, restore {copy['restore_us']} us"
    )
    print(
        f"CNN step under policy='skip': {step['step_ms_off']} ms without, {step['step_ms_kept']} ms with the "
        f"statistics kept; CPU-time ratio {step['ratio']} (median of {len(step['ratios'])} alternating blocks)"
    )
    return 0
