"""`keel bench <what>`: dispatches to one benchmark module, each with ``add_arguments`` and ``main``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

BENCHMARKS: dict[str, tuple[str, str]] = {
    "overhead": ("keel.harness.bench.overhead", "Guard's step-time cost against the bare loop"),
    "snapshot": ("keel.harness.bench.snapshot", "training time blocked per in-memory snapshot vs torch.save"),
    "running-stats": (
        "keel.harness.bench.running_stats",
        "keeping BatchNorm's running statistics across skipped updates: the copy, and a CNN step under skip",
    ),
    "optim": ("keel.harness.bench.optim", "keel optimizers' step time vs torch AdamW(foreach)"),
    "detect": ("keel.harness.bench.detect", "the scenario zoo: right kind detected, lead time, false alarms"),
    "doctor": ("keel.harness.bench.doctor", "keel doctor on the real training logs in shared/data/realruns"),
    "trl": ("keel.harness.bench.trl", "guard_trainer's step-time cost on real TRL DPO/GRPO trainers, per policy"),
    "rl": ("keel.harness.bench.rl", "RL/preference scenarios: keel beside rlwatch on the same logged statistics"),
    "data": ("keel.harness.bench.data", "poisoned examples: attribution, skip list, replay; batch-id overhead"),
    "integrations": (
        "keel.harness.bench.integrations",
        "the HF and Lightning KeelCallback's step-time cost on a real Trainer, per policy",
    ),
}


def reject_unused(args: argparse.Namespace, flags: Sequence[str], why: str) -> None:
    """Refuse the ``flags`` (argument names) that were given — not at their unset value: None, False or an empty
    list (so an option whose default is a value, not None, cannot be checked) — since they have no effect ``why``
    (``"with --ddp"``): one ValueError naming them all.

    Example:
        >>> reject_unused(argparse.Namespace(steps=3, only=None), ("steps", "only"), "without --probe-costs")
        Traceback (most recent call last):
        ValueError: --steps has no effect without --probe-costs; allowed: one or the other
    """
    # (a Namespace built by hand, as the tests do, may lack the flags: unset)
    given = [f"--{name.replace('_', '-')}" for name in flags if _given(getattr(args, name, None))]
    if given:
        verb = "has" if len(given) == 1 else "have"
        raise ValueError(f"{', '.join(given)} {verb} no effect {why}; allowed: one or the other")


def _given(value: object) -> bool:
    return not (value is None or value is False or (isinstance(value, list) and not value))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        bench_parser.set_defaults(_bench_module=module_name)
        importlib.import_module(module_name).add_arguments(bench_parser)


def main(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).main(args) or 0)
