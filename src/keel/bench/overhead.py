"""`keel bench overhead`: the step-time cost of `Guard` on a proxy model, against the bare loop.

Three loops train identical copies of the model: bare (no keel), under `Guard` with the default probes,
and under ``policy="observe"`` with the full per-parameter probes every ``full_log_every`` steps. They run
interleaved — one block of steps each, in rotating order, per repeat — so machine noise hits all three
alike; each repeat gives a ratio to the bare loop's time in the same repeat, and the figure is the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from keel._core.argtypes import device, int_range, positive_int
from keel._core.validate import check_types, require_ints
from keel.bench.loop import train_steps
from keel.guard import Guard
from keel.proxy import ProxyBatches, create_proxy_model, list_proxy_sizes


@dataclass(kw_only=True)
class OverheadConfig:
    """Settings of the overhead benchmark.

    Attributes:
        size: Proxy model size.
        batch_size: Sequences per step.
        seq_len: Bytes per sequence.
        steps: Steps per timed block.
        repeats: Timed blocks per variant (the figure is the median of per-repeat ratios).
        warmup: Untimed steps per variant first.
        full_log_every: ``log_every`` of the full-probe variant.
        device: ``cpu`` or ``cuda``.
    """

    size: str = "small"
    batch_size: int = 16
    seq_len: int = 64
    steps: int = 20
    repeats: int = 7
    warmup: int = 5
    full_log_every: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "batch_size", "seq_len", "steps", "repeats", "full_log_every")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"OverheadConfig.device={self.device!r}; allowed: cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("OverheadConfig.device='cuda' but no CUDA device is available; allowed: cpu")


def _make_loop(config: OverheadConfig, guard_kwargs: dict | None, run_dir: str | None) -> Callable[[int], None]:
    torch.manual_seed(0)
    model = create_proxy_model(config.size, seq_len=config.seq_len).to(config.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    batches = ProxyBatches(batch_size=config.batch_size, seq_len=config.seq_len, seed=0)
    data = [tuple(t.to(config.device) for t in batches.next()) for _ in range(8)]
    guard = Guard(model, opt, run_dir=run_dir, **guard_kwargs) if guard_kwargs is not None else None

    def run(n: int) -> None:
        train_steps(model, opt, data, guard, n)

    run.guard = guard  # type: ignore[attr-defined]
    return run


def bench_overhead(config: OverheadConfig | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Measure Guard's step-time ratios against the bare loop. Returns the figures as a dict."""
    config = config or OverheadConfig()
    with tempfile.TemporaryDirectory() as tmp:
        loops = {
            "bare": _make_loop(config, None, None),
            "default": _make_loop(config, {}, f"{tmp}/default"),
            "full": _make_loop(config, {"policy": "observe", "probes": "full",
                                        "log_every": config.full_log_every}, f"{tmp}/full"),
        }
        for loop in loops.values():
            loop(config.warmup)
        times: dict[str, list[float]] = {name: [] for name in loops}
        names = list(loops)
        for r in range(config.repeats):
            for name in names[r % 3:] + names[: r % 3]:  # rotate the order each repeat
                start = time.perf_counter()
                loops[name](config.steps)
                times[name].append((time.perf_counter() - start) / config.steps)
            if progress is not None:
                progress(f"repeat {r + 1}/{config.repeats}")
        for loop in loops.values():
            if loop.guard is not None:  # type: ignore[attr-defined]
                loop.guard.close()  # type: ignore[attr-defined]

    def ratio(name: str) -> float:
        return statistics.median(t / b for t, b in zip(times[name], times["bare"], strict=True))

    return {
        "ratio_default": ratio("default"),
        "ratio_full": ratio("full"),
        "step_ms": {name: 1e3 * statistics.median(ts) for name, ts in times.items()},
        "config": vars(config),
        "threads": torch.get_num_threads(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = OverheadConfig()
    parser.add_argument("--size", default=defaults.size, choices=list_proxy_sizes(),
                        help="proxy model size (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=positive_int, default=defaults.seq_len)
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="steps per timed block")
    parser.add_argument("--repeats", type=positive_int, default=defaults.repeats)
    parser.add_argument("--full-log-every", type=positive_int, default=None,
                        help=f"log_every of the full-probe variant (default: {defaults.full_log_every}; "
                             "not with --ddp)")
    parser.add_argument("--device", default=defaults.device, type=device("cpu", "cuda"), metavar="{cpu,cuda}")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--ddp", type=int_range(2), default=None, metavar="N",
                        help="measure under DDP with N >= 2 torchrun ranks instead (keel.bench.ddp)")


def main(args: argparse.Namespace) -> int:
    if args.ddp is not None:
        if args.full_log_every is not None:
            raise ValueError("--full-log-every has no effect with --ddp (the DDP benchmark has no full-probe "
                             "variant); allowed: one of them")
        from keel.bench.ddp import main as ddp_main

        return ddp_main(args)
    full_log_every = OverheadConfig.full_log_every if args.full_log_every is None else args.full_log_every
    config = OverheadConfig(size=args.size, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                            repeats=args.repeats, full_log_every=full_log_every, device=args.device)
    progress = None if args.json else (lambda msg: print(f"  {msg}", flush=True))
    result = bench_overhead(config, progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ms = result["step_ms"]
    print(f"proxy {config.size}, batch {config.batch_size}x{config.seq_len}, {config.device}, "
          f"{config.repeats} repeats x {config.steps} steps, interleaved")
    print(f"  bare loop           {ms['bare']:8.2f} ms/step")
    print(f"  Guard default       {ms['default']:8.2f} ms/step   ratio {result['ratio_default']:.4f}")
    print(f"  observe, full probes{ms['full']:8.2f} ms/step   ratio {result['ratio_full']:.4f}"
          f"  (per-parameter signals every {config.full_log_every} step(s))")
    return 0
