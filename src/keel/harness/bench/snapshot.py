"""`keel bench snapshot`: training time blocked per in-memory snapshot, against a synchronous ``torch.save``.

For each model size (an MLP stack with AdamW state, so a snapshot holds parameters and both moments), in one
process: (1) keel's `SnapshotRing.take`, then one forward/backward of the model — the work a snapshot
overlaps in a real loop — then the fence; the blocked time is what ``take`` and the fence cost the loop.
(2) ``torch.save`` of the same model and optimizer state to a file, which blocks for all of it. The ratio is
torch_save_s / blocked_s, medians over repeats; the first (cold, allocating) take is reported apart. The
copy's bandwidth is measured separately, fencing right after ``take`` with no work to hide behind, and so
is the cost the background copy does impose: the overlapped forward/backward against the same work alone
(on a 2-core CPU the copy competes with the model for cores; on a GPU it uses the copy engine).

``--lora``: a peft LoRA fine-tune (a Llama built from a config, `LORA_LLAMA`, rank 8 on q_proj/v_proj): keel's
snapshot, which leaves the frozen base out (`keel.recover.fixed`), against a full copy of every parameter
(``copy_fixed=True``, keel's snapshot before), the two arms alternating in each repeat, each copied on the thread a
Guard would choose here (``background=None``); and the one-off cost of the base's checksum that disk snapshots
record.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from keel._core.argtypes import ArgumentValueError, device, positive_int, show
from keel._core.validate import check_types
from keel.harness.bench._progress import bench_progress
from keel.recover import SnapshotRing, TrainingState
from keel.recover.fixed import checksum

SIZES = {"50M": (2048, 12), "200M": (4096, 12)}
# ~34M parameters (8 layers, 512 wide, vocabulary 8192): big enough that the base dominates, built in seconds
LORA_LLAMA: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 8192,
    "max_position_embeddings": 256,
}
LORA_RANK = 8
EXTRA = "pip install 'keel[test]' (transformers and peft)"


@dataclass(kw_only=True)
class SnapshotBenchConfig:
    """Settings of the snapshot benchmark.

    Attributes:
        sizes: Model sizes from ``SIZES`` (``50M``: 12 × 2048², ``200M``: 12 × 4096² parameters).
        repeats: Timed repeats per size.
        batch: Rows of the forward/backward that the background copy overlaps.
        device: ``cpu`` or ``cuda``.
        lora: Also measure a LoRA fine-tune's snapshot against a full copy (needs transformers and peft).
    """

    sizes: tuple[str, ...] = ("50M", "200M")
    repeats: int = 3
    batch: int = 16
    device: str = "cpu"
    lora: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        if self.lora and (importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None):
            raise ValueError(f"SnapshotBenchConfig.lora=True needs transformers and peft; allowed: with them ({EXTRA})")
        unknown = [s for s in self.sizes if s not in SIZES]
        if unknown:
            raise ValueError(f"SnapshotBenchConfig.sizes={unknown}; allowed: {', '.join(SIZES)}")
        if self.repeats < 1:
            raise ValueError(f"SnapshotBenchConfig.repeats={self.repeats}; allowed: an int >= 1")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available; allowed: cpu")


def _model(width: int, depth: int, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device=device)).sum().backward()
    opt.step()  # creates the moments: the snapshot holds 3 tensors per parameter
    opt.zero_grad(set_to_none=True)
    return model, opt


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_snapshot(config: SnapshotBenchConfig | None = None, progress=None) -> dict:
    """Measure blocked time per snapshot and torch.save time for each size; returns the figures."""
    config = config or SnapshotBenchConfig()
    results = []
    for size in config.sizes:
        width, depth = SIZES[size]
        model, opt = _model(width, depth, config.device)
        state = TrainingState(model=model, optimizer=opt)
        ring = SnapshotRing(capacity=1, background=True)  # the background path: what overlaps, and at what cost
        x = torch.randn(config.batch, width, device=config.device)
        start = time.perf_counter()
        snap = ring.take(0, state)
        ring.fence()
        cold_s = time.perf_counter() - start
        nbytes = snap.nbytes()
        blocked, saved, copy, work_alone, work_overlapped = [], [], [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(config.repeats):
                _sync(config.device)
                t0 = time.perf_counter()
                ring.take(r + 1, state)
                t1 = time.perf_counter()
                model(x).sum().backward()  # the work the copy overlaps
                _sync(config.device)
                t2 = time.perf_counter()
                ring.fence()
                t3 = time.perf_counter()
                blocked.append((t1 - t0) + (t3 - t2))
                work_overlapped.append(t2 - t1)
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                model(x).sum().backward()  # the same work with no copy running
                _sync(config.device)
                work_alone.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                ring.take(r + 100, state)
                ring.fence()
                copy.append(time.perf_counter() - t0)
                path = os.path.join(tmp, "state.pt")
                _sync(config.device)
                t0 = time.perf_counter()
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
                saved.append(time.perf_counter() - t0)
                os.unlink(path)
                if progress is not None:
                    progress(f"{size}: repeat {r + 1}/{config.repeats}")
        ring.close()
        params = sum(p.numel() for p in model.parameters())
        blocked_s, save_s, copy_s = statistics.median(blocked), statistics.median(saved), statistics.median(copy)
        results.append(
            {
                "size": size,
                "params": params,
                "bytes": nbytes,
                "blocked_s": blocked_s,
                "torch_save_s": save_s,
                "ratio": save_s / blocked_s,
                "cold_take_s": cold_s,
                "copy_s": copy_s,
                "copy_gb_per_s": nbytes / copy_s / 1e9,
                "work_s": statistics.median(work_alone),
                "work_with_copy_s": statistics.median(work_overlapped),
            }
        )
        del model, opt, state, ring, snap
    figures = {"device": config.device, "threads": torch.get_num_threads(), "repeats": config.repeats}
    figures["results"] = results
    if config.lora:
        figures["lora"] = bench_lora(config, progress)
    return figures


def _lora_model(device: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    import peft
    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LORA_LLAMA, bos_token_id=0, eos_token_id=0))
    lora = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(base, lora).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, LORA_LLAMA["vocab_size"], (2, 64), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # creates the adapters' moments
    opt.zero_grad(set_to_none=True)
    return model, opt, ids


def bench_lora(config: SnapshotBenchConfig, progress=None) -> dict:
    """Blocked time and bytes of keel's LoRA snapshot (the frozen base left out) against a full copy, medians of
    ``config.repeats`` with the arms alternating; and the time of the base's checksum (once per run, on disk)."""
    model, opt, ids = _lora_model(config.device)
    state = TrainingState(model=model, optimizer=opt)
    # The copy thread as a Guard chooses it (a spare core: in the background; none: in place, blocking the step)
    rings = {"keel": SnapshotRing(capacity=1), "full": SnapshotRing(capacity=1, copy_fixed=True)}
    nbytes = {}
    for name, ring in rings.items():  # the cold take allocates: not timed
        nbytes[name] = ring.take(0, state).nbytes()
        ring.fence()
    blocked: dict[str, list[float]] = {name: [] for name in rings}
    copy: dict[str, list[float]] = {name: [] for name in rings}
    for r in range(config.repeats):
        for name, ring in rings.items():
            _sync(config.device)
            t0 = time.perf_counter()
            ring.take(2 * r + 1, state)
            t1 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()  # the work the copy overlaps
            _sync(config.device)
            t2 = time.perf_counter()
            ring.fence()
            blocked[name].append((t1 - t0) + (time.perf_counter() - t2))
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            ring.take(2 * r + 2, state)
            ring.fence()
            copy[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress(f"lora: repeat {r + 1}/{config.repeats}")
    for ring in rings.values():
        ring.close()
    fixed = [p for p in model.parameters() if not p.requires_grad]
    _sync(config.device)
    t0 = time.perf_counter()
    for p in fixed:
        checksum(p)
    checksum_s = time.perf_counter() - t0
    fixed_bytes = sum(p.numel() * p.element_size() for p in fixed)
    med = {name: (statistics.median(blocked[name]), statistics.median(copy[name])) for name in rings}
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "rank": LORA_RANK,
        "background": rings["keel"].background,
        "bytes": nbytes["keel"],
        "full_bytes": nbytes["full"],
        "blocked_s": med["keel"][0],
        "full_blocked_s": med["full"][0],
        "copy_s": med["keel"][1],
        "full_copy_s": med["full"][1],
        "bytes_ratio": nbytes["full"] / nbytes["keel"],
        "blocked_ratio": med["full"][0] / med["keel"][0],
        "checksum_s": checksum_s,
        "checksum_gb_per_s": fixed_bytes / checksum_s / 1e9 if checksum_s > 0 else None,
        "fixed_bytes": fixed_bytes,
    }


def _sizes(text: str) -> tuple[str, ...]:
    sizes = tuple(text.split(","))
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ArgumentValueError(
            f"{show(text)}: unknown {', '.join(map(repr, unknown))}; allowed: a "
            f"comma-separated subset of {', '.join(SIZES)}"
        )
    twice = sorted({s for s in sizes if sizes.count(s) > 1}, key=sizes.index)
    if twice:
        raise ArgumentValueError(
            f"{show(text)}: {', '.join(twice)} given twice; allowed: each of {', '.join(SIZES)} at most once"
        )
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="50M,200M", type=_sizes, help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", default="cpu", type=device("cpu", "cuda"), metavar="{cpu,cuda}")
    parser.add_argument(
        "--lora", action="store_true", help="also a peft LoRA fine-tune: keel's snapshot vs a full copy"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def main(args: argparse.Namespace) -> int:
    config = SnapshotBenchConfig(sizes=args.sizes, repeats=args.repeats, device=args.device, lora=args.lora)
    total = (len(config.sizes) + config.lora) * config.repeats
    with bench_progress(total, "keel bench snapshot", enabled=not args.json) as progress:
        result = bench_snapshot(config, progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{'size':>6} {'params':>12} {'state GB':>9} {'blocked s':>10} {'torch.save s':>13} {'ratio':>8} "
        f"{'cold take s':>12} {'copy GB/s':>10} {'fwd/bwd s alone→overlapped':>27}"
    )
    for r in result["results"]:
        print(
            f"{r['size']:>6} {r['params']:>12,} {r['bytes'] / 1e9:>9.2f} {r['blocked_s']:>10.4f} "
            f"{r['torch_save_s']:>13.3f} {r['ratio']:>8.1f} {r['cold_take_s']:>12.3f} {r['copy_gb_per_s']:>10.2f} "
            f"{r['work_s']:>15.3f} → {r['work_with_copy_s']:.3f}"
        )
    if "lora" in result:
        _print_lora(result["lora"])
    return 0


def _print_lora(r: dict) -> None:
    print(
        f"\nLoRA: Llama from a config, {r['params'] / 1e6:.1f}M parameters, rank {r['rank']} on q_proj/v_proj "
        f"({r['trainable']:,} trainable); copied {'in the background' if r['background'] else 'in place'} "
        "as a Guard does here; medians of the arms alternating"
    )
    print(f"{'snapshot':>30} {'state MB':>9} {'blocked s':>10} {'copy s':>8}")
    for label, suffix in (("full copy (copy_fixed=True)", "full_"), ("keel (frozen base left out)", "")):
        megabytes, blocked, copied = r[suffix + "bytes"] / 1e6, r[suffix + "blocked_s"], r[suffix + "copy_s"]
        print(f"{label:>30} {megabytes:>9.2f} {blocked:>10.4f} {copied:>8.4f}")
    print(f"{'full / keel':>30} {r['bytes_ratio']:>8.1f}x {r['blocked_ratio']:>9.1f}x")
    print(
        f"base checksum for disk snapshots (once per run): {r['checksum_s']:.3f} s for "
        f"{r['fixed_bytes'] / 1e6:.0f} MB ({r['checksum_gb_per_s']:.2f} GB/s)"
    )
