"""`keel bench overhead --ddp N`: Guard's step-time cost under DDP (torchrun, N ranks), against bare DDP.

The command starts ``torchrun --nproc_per_node=N`` on this module. Every rank trains three DDP copies of the
proxy model, interleaved block by block in rotating order as `keel bench overhead` does: bare DDP, DDP under a
`Guard` with the default probes (one extra all-reduce of the packed signals per step, plus the communication
hook that measures each rank's own gradient), and the same without the hook (``rank_stats=False``). Each
repeat gives a ratio to the bare loop's time in the same repeat; the figures are medians, from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

VARIANTS = ("bare", "default", "no_rank_stats")


@dataclass(kw_only=True)
class DDPOverheadConfig:
    """Settings of the DDP overhead benchmark.

    Attributes:
        nproc: Ranks (processes) on this machine.
        backend: ``gloo`` (CPU) or ``nccl`` (one GPU per rank).
        size: Proxy model size.
        batch_size: Sequences per step and rank.
        seq_len: Bytes per sequence.
        steps: Steps per timed block.
        repeats: Timed blocks per variant.
        warmup: Untimed steps per variant first.
    """

    nproc: int = 2
    backend: str = "gloo"
    size: str = "small"
    batch_size: int = 8
    seq_len: int = 64
    steps: int = 10
    repeats: int = 7
    warmup: int = 3

    def __post_init__(self) -> None:
        from keel._core.validate import check_types, require_ints

        check_types(self)

        require_ints(self, "steps", "repeats", "batch_size", "seq_len")
        require_ints(self, "nproc", minimum=2)
        require_ints(self, "warmup", minimum=0)
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"DDPOverheadConfig.backend={self.backend!r}; allowed: gloo, nccl")


def bench_ddp_overhead(config: DDPOverheadConfig | None = None, timeout: float = 1800) -> dict:
    """Run the benchmark under torchrun; returns rank 0's figures as a dict."""
    config = config or DDPOverheadConfig()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(config.nproc),
            "-m",
            "keel.harness.bench.ddp",
            "--worker",
            json.dumps(asdict(config)),
            str(out),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def _worker(config: DDPOverheadConfig, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from keel.guard import Guard
    from keel.guard.distributed import DistributedConfig
    from keel.harness.bench.loop import train_steps
    from keel.proxy import ProxyBatches, create_proxy_model

    dist.init_process_group(config.backend)
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if config.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def make_loop(variant: str, run_dir: str) -> Callable[[int], None]:
        torch.manual_seed(0)
        model = DDP(create_proxy_model(config.size, seq_len=config.seq_len).to(device))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        batches = ProxyBatches(batch_size=config.batch_size, seq_len=config.seq_len, seed=rank)
        data = [(x.to(device), y.to(device)) for x, y in (batches.next() for _ in range(8))]
        guard = None
        if variant != "bare":
            guard = Guard(model, opt, run_dir=run_dir, distributed=DistributedConfig(rank_stats=variant == "default"))

        def run(n: int) -> None:
            train_steps(model, opt, data, guard, n)

        run.guard = guard  # type: ignore[attr-defined]
        return run

    with tempfile.TemporaryDirectory() as tmp:
        loops = {name: make_loop(name, f"{tmp}/{name}") for name in VARIANTS}
        for loop in loops.values():
            loop(config.warmup)
        times: dict[str, list[float]] = {name: [] for name in loops}
        for r in range(config.repeats):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # the same rotation on every rank
            for name in order:
                dist.barrier()
                start = time.perf_counter()
                loops[name](config.steps)
                times[name].append((time.perf_counter() - start) / config.steps)
        for loop in loops.values():
            if loop.guard is not None:  # type: ignore[attr-defined]
                loop.guard.close()  # type: ignore[attr-defined]
    if rank == 0:

        def ratio(name: str) -> float:
            return statistics.median(t / b for t, b in zip(times[name], times["bare"], strict=True))

        Path(out).write_text(
            json.dumps(
                {
                    "ratio_default": ratio("default"),
                    "ratio_no_rank_stats": ratio("no_rank_stats"),
                    "step_ms": {name: 1e3 * statistics.median(ts) for name, ts in times.items()},
                    "config": asdict(config),
                    "world_size": dist.get_world_size(),
                    "threads": torch.get_num_threads(),
                    "parameters": sum(
                        p.numel() for p in create_proxy_model(config.size, seq_len=config.seq_len).parameters()
                    ),
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def main(args: argparse.Namespace) -> int:
    """Entry from `keel bench overhead --ddp N` (see `keel.harness.bench.overhead`)."""
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.ddp:
            raise ValueError(
                f"--ddp {args.ddp} --device cuda needs a GPU per rank, and {torch.cuda.device_count()} "
                "are visible; allowed: --ddp up to that, or --device cpu"
            )
    config = DDPOverheadConfig(
        nproc=args.ddp,
        backend="nccl" if args.device == "cuda" else "gloo",
        size=args.size,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        repeats=args.repeats,
    )
    if not args.json:
        print(f"  torchrun --nproc_per_node={config.nproc} ({config.backend}) …", flush=True)
    result = bench_ddp_overhead(config)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ms = result["step_ms"]
    print(
        f"proxy {config.size}, DDP x{config.nproc} ({config.backend}), batch {config.batch_size}x{config.seq_len} "
        f"per rank, {config.repeats} repeats x {config.steps} steps, interleaved"
    )
    print(f"  bare DDP                    {ms['bare']:8.2f} ms/step")
    print(f"  Guard default               {ms['default']:8.2f} ms/step   ratio {result['ratio_default']:.4f}")
    print(
        f"  Guard, no per-rank hook     {ms['no_rank_stats']:8.2f} ms/step   ratio {result['ratio_no_rank_stats']:.4f}"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(DDPOverheadConfig(**json.loads(sys.argv[2])), sys.argv[3])
    else:
        raise SystemExit("run it as: keel bench overhead --ddp N")
