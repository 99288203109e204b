"""`keel bench data`: which data did it — keel's attribution, skip list and replay on poisoned examples (issue 17).

Three parts:

1. **The scenario** (`keel.harness.scenarios.data.poisoned_examples`), once per detector setting: ``default``
   (keel's detectors as shipped) and ``sensitive`` (the gradient-norm spike detector's ``critical`` at 5× its
   median and robust z 8, instead of 20× and z 12). Precision / recall of the examples keel names (among each
   attributed finding's top offenders, as outliers, in the skip list) over the poisoned set; the poisoned ids
   a resumed and a fresh run that honour the skip list draw; each run's held-out loss against a run that never
   had the poisoned examples; how replay classified the step whose gradient was corrupted and the poisoned
   steps.
2. **Overhead**: ``Guard.step(loss)`` against ``Guard.step(loss, batch_ids=ids)`` and ``Guard.step(loss,
   batch_ids=ids, batch=batch)`` with an `Attribution` (and replay) configured, on clean batches (no finding: the
   run is checked to have none). One process, every variant its own model; blocks of steps taken in rotating
   order, the ratio of each block to the plain Guard's block of the same repeat, median over repeats; a second
   plain Guard is the A/A control.
3. **Cost on a bad step**: one attribution (per-example losses; with per-example gradient norms) and one replay,
   in ms and in median steps of the plain Guard.

Example:
    keel bench data                 # the full scenario, both settings, overhead and costs
    keel bench data --quick --json  # smaller (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

import keel
from keel._core.argtypes import cpu_threads
from keel.guard.console import silenced
from keel.harness.scenarios.data import PoisonConfig, run_poisoned_examples
from keel.harness.scenarios.data._corpus import IndexedWindows, batched
from keel.harness.scenarios.data.poisoned_examples import example_losses
from keel.proxy import create_proxy_model
from keel.recover import RecoveryConfig
from keel.recover.replay import StepReplay
from keel.signals.attribution import example_grad_norms
from keel.signals.attribution import example_losses as measure_losses

# "sensitive": the gradient-norm spike detector's critical at robust z 8 and 5x its median (keel: z 12 and 20x).
# Chosen after seeing the runs, and said so: the poisoned batches reached 5.8-16.5x (z 8.6-13.8) and the largest
# clean one-step outlier 3.5x (z 6.2); keel's defaults skip none of them.
SETTINGS: dict[str, tuple[float, float] | None] = {"default": None, "sensitive": (8.0, 4.0)}
VARIANTS = ("guard", "guard + batch_ids", "guard + batch_ids + batch, attribution, replay", "guard again (A/A)")


def bench_scenarios(*, quick: bool, settings: list[str]) -> dict[str, Any]:
    """The poisoned-examples scenario under each detector setting."""
    make = PoisonConfig.quick if quick else PoisonConfig
    results = {}
    for name in settings:
        config = make(grad_critical=SETTINGS[name])
        results[name] = {"config": asdict(config), **asdict(run_poisoned_examples(config))}
    return results


def bench_overhead(*, quick: bool) -> dict[str, Any]:
    """Step time with batch ids (and batch=) against the plain Guard; no finding on these clean batches."""
    steps, repeats, warmup = (10, 5, 5) if quick else (20, 9, 10)
    data = IndexedWindows(examples=16 * (warmup + steps * repeats), seq_len=64, seed=0)
    order = list(batched(range(len(data)), 16))
    loops = {name: _loop(i, data, order) for i, name in enumerate(VARIANTS)}
    with silenced():
        for loop in loops.values():
            loop(warmup)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for r in range(repeats):
            shift = r % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                times[name].append(loops[name](steps))
        findings = {}
        for name, loop in loops.items():
            guard = loop.guard  # type: ignore[attr-defined]
            guard.close()
            findings[name] = sum(f.severity in ("warning", "critical") for f in guard.findings)
    base = times["guard"]
    return {
        "step_ms": {name: round(1e3 * statistics.median(t) / steps, 3) for name, t in times.items()},
        "ratio": {
            name: round(statistics.median(a / b for a, b in zip(t, base, strict=True)), 4)
            for name, t in times.items()
            if name != "guard"
        },
        "warnings_or_criticals": findings,
        "steps": steps,
        "repeats": repeats,
        "model": "proxy tiny, batch 16x64",
    }


def _loop(index: int, data: IndexedWindows, order: list[list[int]]) -> Callable[[int], float]:
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    name = VARIANTS[index]
    rich = "attribution" in name
    guard = keel.Guard(
        model,
        opt,
        policy="skip",
        attribution=keel.Attribution(loss_fn=example_losses) if rich else None,
        recovery=RecoveryConfig(replay=True) if rich else None,
    )
    with_ids = "batch_ids" in name
    position = 0

    def run(n: int) -> float:
        nonlocal position
        start = time.perf_counter()
        for _ in range(n):
            ids = order[position % len(order)]
            position += 1
            batch = data.batch(ids)
            loss = example_losses(model, batch).mean()
            loss.backward()
            if with_ids:
                guard.step(loss, batch_ids=ids, batch=batch if rich else None)
            else:
                guard.step(loss)
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    run.guard = guard  # type: ignore[attr-defined]
    return run


def bench_costs(*, quick: bool, step_ms: float) -> dict[str, Any]:
    """One attribution (losses; losses + per-example gradient norms) and one replay on a batch of 16, median ms."""
    repeats = 3 if quick else 7
    data = IndexedWindows(examples=16, seq_len=64, seed=0)
    torch.manual_seed(0)
    model: nn.Module = create_proxy_model("tiny", seq_len=64)
    batch = data.batch(list(range(16)))
    params = [p for p in model.parameters() if p.requires_grad]
    replay = StepReplay(model, params, rtol=0.1)
    replay.mark_step_start()
    how: list[str] = []

    def grad_norms() -> None:
        how.append(example_grad_norms(model, example_losses, batch)[1])

    jobs: dict[str, Callable[[], Any]] = {
        "example_losses": lambda: measure_losses(model, example_losses, batch),
        "example_grad_norms": grad_norms,
        "replay": lambda: replay.replay(example_losses, batch, loss=1.0, grad_norm=1.0),
    }
    ms = {}
    for name, job in jobs.items():
        job()  # warm-up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            job()
            samples.append(1e3 * (time.perf_counter() - start))
        ms[name] = round(statistics.median(samples), 2)
    ms["attribution_with_grad_norms"] = round(ms["example_losses"] + ms["example_grad_norms"], 2)
    return {
        "ms": ms,
        "steps": {name: round(v / step_ms, 2) for name, v in ms.items()},
        "grad_norms_by": how[-1] if how else None,
        "batch": "16x64, proxy tiny",
    }


def bench_data(*, quick: bool = False, settings: list[str] | None = None) -> dict[str, Any]:
    """Every part: ``{"scenarios": {...}, "overhead": {...}, "costs": {...}}``."""
    settings = settings or list(SETTINGS)
    overhead = bench_overhead(quick=quick)
    costs = bench_costs(quick=quick, step_ms=overhead["step_ms"]["guard"])
    return {
        "scenarios": bench_scenarios(quick=quick, settings=settings),
        "overhead": overhead,
        "costs": costs,
        "quick": quick,
        "threads": torch.get_num_threads(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller runs (tests)")
    parser.add_argument(
        "--setting",
        action="append",
        choices=list(SETTINGS),
        help="detector setting of the scenario (repeatable; default: both): default = keel's detectors as shipped, "
        "sensitive = gradient-norm critical at 5x and z 8 instead of 20x and z 12",
    )
    parser.add_argument("--threads", type=cpu_threads, default=1, help="torch threads (default: 1)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    result = bench_data(quick=args.quick, settings=args.setting)
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        print()
        return 0
    for line in describe(result):
        print(line)
    return 0


def describe(result: dict[str, Any]) -> list[str]:
    """The figures as text lines."""
    lines = [f"keel bench data{' --quick' if result['quick'] else ''}: poisoned examples (runs of byte 0x00)"]
    for name, s in result["scenarios"].items():
        cfg = s["config"]
        lines.append(
            f"  [{name}] {len(s['poisoned_ids'])} poisoned ({cfg['per_batch']} of {cfg['batch_size']} in the batches "
            f"of steps {s['poisoned_steps']}), gradient x{1e3:g} at step {cfg['fault_step']}"
        )
        for way, score in s["scores"].items():
            lines.append(
                f"    named {way:22s} {score['poisoned_named']}/{len(s['poisoned_ids'])} poisoned of {score['named']}"
                f" named  precision {score['precision']}  recall {score['recall']}"
            )
        lines.append(
            f"    replay: corrupted step -> {s['fault'].get('verdict')}; poisoned steps -> {s['poisoned_verdicts']}"
        )
        lines.append(
            f"    poisoned ids drawn: resumed (from step {s['resumed_from_step']}) {s['drawn']['resumed']}, "
            f"fresh {s['drawn']['fresh']}"
        )
        rel = s["relative_to_clean"]
        lines.append(
            "    held-out loss vs never-poisoned: "
            + ", ".join(f"{k} {100 * v:+.2f}%" for k, v in rel.items() if k != "clean")
            + f" (clean {s['final_loss']['clean']:.4f})"
        )
    o = result["overhead"]
    lines.append(
        f"  overhead ({o['model']}, {o['repeats']} repeats x {o['steps']} steps, medians of interleaved blocks):"
    )
    lines.append(f"    {'guard':50s} {o['step_ms']['guard']:8.2f} ms/step")
    for name, ratio in o["ratio"].items():
        lines.append(f"    {name:50s} {o['step_ms'][name]:8.2f} ms/step  ratio {ratio:.4f}")
    lines.append(f"    warning/critical findings per variant: {o['warnings_or_criticals']}")
    c = result["costs"]
    lines.append(
        "  one bad step: "
        + ", ".join(f"{k} {v} ms ({c['steps'][k]} steps)" for k, v in c["ms"].items())
        + f"; per-example gradient norms by {c['grad_norms_by']}"
    )
    return lines
