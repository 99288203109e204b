"""`keel bench optim`: the step time of each keel optimizer against ``torch.optim.AdamW(foreach=True)``.

Every optimizer steps its own copy of a ~10M-parameter proxy model. Before each step the same gradients
(one of a few real gradient sets, in rotation) are copied in, untimed; only ``optimizer.step()`` is timed.
The optimizers run interleaved — a block of steps each, in rotating order, per repeat — so machine noise
hits all alike; each repeat gives a ratio to AdamW's time in that repeat and the figure is the median.

By default every optimizer's second moments start where a run has them 250 updates after a (re)start —
v = (1 − β2^250)·mean g², mid-way through SPAM's 500-step reset period — so that what depends on the data
(how many tensors SPAM must clamp) is what a run sees, not its first steps, where v ≈ 0.001·k·g² makes
SPAM's spike test fire in most tensors. ``steady_state=False`` measures those first steps instead.
Achieved bandwidth is reported against the bytes each step must move (fp32: AdamW reads p, g, m, v and
writes p, m, v — 28 B/parameter).

``adamw_fused`` (``torch.optim.AdamW(fused=True)``) is timed for context, not as the baseline: on CPU,
SPAM and Stable-SPAM run their Adam part through that same fused kernel, so it is the floor they approach
and the fair comparison for a user who already runs fused AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from keel._core.argtypes import cpu_threads, device, positive_int
from keel._core.validate import check_types
from keel.harness.bench._progress import bench_progress
from keel.optim import SPAM, AdaClip, IndependentAdamW, OrthoGrad, StableSPAM
from keel.proxy import ProxyBatches, create_proxy_model

BASELINE = "adamw"

# Bytes per fp32 parameter a fused kernel of each update must move (read + write), the floor the
# achieved bandwidth is measured against. Clipping against v needs no extra traffic; a gradient
# statistic taken before the update (max|g|, ‖g‖) costs one more read of g; ⊥Grad reads w and g once
# more for w·g and the norms, and writes g⊥.
BYTES_PER_PARAM: dict[str, int] = {
    "adamw": 28,
    "adamw_fused": 28,
    "independent_adamw": 28,
    "spam": 28,
    "stable_spam": 32,
    "ada_clip+adamw": 32,
    "orthograd": 40,
}


def _factories(lr: float) -> dict[str, Callable[[list[torch.nn.Parameter]], Optimizer]]:
    def adamw(params: list[torch.nn.Parameter]) -> Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=True)

    def ada_clip_adamw(params: list[torch.nn.Parameter]) -> Optimizer:
        opt = adamw(params)
        AdaClip(params).attach(opt)
        return opt

    return {
        "adamw": adamw,
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01, fused=True),
        "spam": lambda ps: SPAM(ps, lr=lr, weight_decay=0.01, grace_steps=2),
        "stable_spam": lambda ps: StableSPAM(ps, lr=lr, weight_decay=0.01),
        "independent_adamw": lambda ps: IndependentAdamW(ps, lr=lr, weight_decay=1e-4, foreach=True),
        "orthograd": lambda ps: OrthoGrad(adamw(ps)),
        "ada_clip+adamw": ada_clip_adamw,
    }


OPTIMIZERS = tuple(_factories(1e-3))


@dataclass(kw_only=True)
class OptimBenchConfig:
    """Settings of the optimizer benchmark.

    Attributes:
        d_model: Width of the proxy model (384 with 6 layers ≈ 10.8M parameters).
        n_layers: Depth of the proxy model.
        steps: Optimizer steps per timed block.
        repeats: Timed blocks per optimizer (the figure is the median of per-repeat ratios).
        warmup: Untimed steps per optimizer first (moments allocated, clipping past its grace period).
        grad_sets: Distinct real gradients rotated through, so statistics such as AdaClip's move as in
            training.
        optimizers: Which optimizers to time; AdamW (the baseline) is always included.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
        threads: CPU threads for torch; None keeps torch's default.
        steady_state: Start every optimizer 250 updates into a run (see the module docstring).
    """

    d_model: int = 384
    n_layers: int = 6
    steps: int = 5
    repeats: int = 9
    warmup: int = 3
    grad_sets: int = 3
    optimizers: tuple[str, ...] = field(default=OPTIMIZERS)
    device: str = "auto"
    threads: int | None = None
    steady_state: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("d_model", "n_layers", "steps", "repeats", "grad_sets"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"OptimBenchConfig.{name}={getattr(self, name)!r}; allowed: an int >= 1")
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown:
            raise ValueError(f"OptimBenchConfig.optimizers has {unknown}; allowed: {', '.join(OPTIMIZERS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"OptimBenchConfig.device={self.device!r}; allowed: auto, cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("OptimBenchConfig.device='cuda' but no CUDA device is available; allowed: cpu, auto")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def _gradient_sets(config: OptimBenchConfig, device: str) -> tuple[list[list[torch.Tensor]], int]:
    torch.manual_seed(0)
    model = create_proxy_model(
        "large", d_model=config.d_model, n_layers=config.n_layers, n_heads=max(1, config.d_model // 64)
    ).to(device)
    batches = ProxyBatches(batch_size=8, seq_len=64, seed=0)
    sets = []
    for _ in range(config.grad_sets):
        x, y = (t.to(device) for t in batches.next())
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        sets.append([p.grad.detach().clone() for p in model.parameters() if p.grad is not None])
    return sets, sum(p.numel() for p in model.parameters())


SETTLED_STEPS = 250  # mid-way through SPAM's 500-step reset period


@torch.no_grad()
def _settle(opt: Optimizer, grad_sets: list[list[torch.Tensor]]) -> None:
    """Put every second moment where a run has it ``SETTLED_STEPS`` updates after a (re)start:
    v = (1 − β2^j)·mean g² over the gradient sets.

    v is the one statistic that takes ~1/(1−β2) = 1000 steps to settle, and SPAM restarts it every 500,
    so mid-period is its typical state; AdaClip's and AdaGN's running values are bias-corrected and
    representative after the warm-up steps already.
    """
    i = 0  # parameters in group order match the gradient sets' order
    for group in opt.param_groups:
        fill = 1.0 - group["betas"][1] ** SETTLED_STEPS
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "exp_avg_sq" in state:
                state["exp_avg_sq"].copy_(torch.stack([g[i].square() for g in grad_sets]).mean(0).mul_(fill))
            i += 1


def bench_optim(config: OptimBenchConfig | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Time each optimizer's ``step()`` against AdamW(foreach) in the same process; returns the figures.

    Returns:
        ``{"results": [{"optimizer", "ratio_vs_adamw", "step_ms", "gb_per_s", "bytes_per_param"}, ...],
        "params", "device", "threads", "config"}`` — ratios are medians over repeats of (time / AdamW's
        time in the same repeat).
    """
    config = config or OptimBenchConfig()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = config.resolved_device()
    grad_sets, n_params = _gradient_sets(config, device)
    names = [BASELINE] + [o for o in config.optimizers if o != BASELINE]
    factories = _factories(1e-3)
    states: dict[str, tuple[list[torch.nn.Parameter], Optimizer]] = {}
    for name in names:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn_like(g) * 0.02) for g in grad_sets[0]]
        states[name] = (params, factories[name](params))

    cursor = {"k": 0}

    def run(name: str, steps: int) -> float:
        params, opt = states[name]
        elapsed = 0.0
        for _ in range(steps):
            grads = grad_sets[cursor["k"] % len(grad_sets)]
            for p, g in zip(params, grads, strict=True):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            cursor["k"] += 1
        return elapsed / steps

    for name in names:
        run(name, config.warmup)
        if config.steady_state:
            _settle(states[name][1], grad_sets)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(config.repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order each repeat
            times[name].append(run(name, config.steps))
        if progress is not None:
            progress(f"repeat {r + 1}/{config.repeats}")

    results = []
    for name in names:
        step_s = statistics.median(times[name])
        results.append(
            {
                "optimizer": name,
                "ratio_vs_adamw": statistics.median(t / b for t, b in zip(times[name], times[BASELINE], strict=True)),
                "step_ms": 1e3 * step_s,
                "bytes_per_param": BYTES_PER_PARAM[name],
                "gb_per_s": BYTES_PER_PARAM[name] * n_params / step_s / 1e9,
            }
        )
    return {
        "results": results,
        "params": n_params,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "config": {**vars(config), "optimizers": list(config.optimizers)},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = OptimBenchConfig()
    parser.add_argument(
        "--d-model", type=positive_int, default=defaults.d_model, help="proxy width (default: %(default)s)"
    )
    parser.add_argument(
        "--layers", type=positive_int, default=defaults.n_layers, help="proxy depth (default: %(default)s)"
    )
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="steps per timed block")
    parser.add_argument("--repeats", type=positive_int, default=defaults.repeats)
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=list(defaults.optimizers),
        choices=OPTIMIZERS,
        metavar="NAME",
        help=f"subset of: {', '.join(OPTIMIZERS)}",
    )
    parser.add_argument(
        "--device", default=defaults.device, type=device("auto", "cpu", "cuda"), metavar="{auto,cpu,cuda}"
    )
    parser.add_argument("--threads", type=cpu_threads, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--early",
        action="store_true",
        help="time the first steps of a run instead of a state 250 updates in",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def main(args: argparse.Namespace) -> int:
    config = OptimBenchConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        steps=args.steps,
        repeats=args.repeats,
        optimizers=tuple(args.optimizers),
        device=args.device,
        threads=args.threads,
        steady_state=not args.early,
    )
    with bench_progress(config.repeats, "keel bench optim", enabled=not args.json) as progress:
        result = bench_optim(config, progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    phase = f"state {SETTLED_STEPS} updates into a run" if config.steady_state else "first steps of a run"
    print(
        f"{result['params'] / 1e6:.1f}M-parameter proxy, {result['device']}, {result['threads']} thread(s), "
        f"{config.repeats} repeats x {config.steps} steps, interleaved, {phase}; "
        "only optimizer.step() is timed"
    )
    print(f"  {'optimizer':<18}{'ms/step':>10}{'vs AdamW':>10}{'GB/s':>8}  (bytes/param)")
    for row in result["results"]:
        print(
            f"  {row['optimizer']:<18}{row['step_ms']:>10.2f}{row['ratio_vs_adamw']:>10.3f}"
            f"{row['gb_per_s']:>8.1f}  ({row['bytes_per_param']})"
        )
    return 0


if __name__ == "__main__":  # `python -m keel.harness.bench.optim`, the same as `keel bench optim`
    import sys

    _parser = argparse.ArgumentParser(prog="keel bench optim", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
