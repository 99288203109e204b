"""`keel bench integrations`: what keel's Hugging Face and Lightning callbacks cost a real ``Trainer`` step, per
policy.

Each framework's ``Trainer`` trains a small Llama built from a config on the proxy corpus
(`keel.harness.bench._integrations_tiny`) in variants: bare (no keel), and with its ``KeelCallback(policy=p)``
(`keel.integrations.hf`, `keel.integrations.lightning`) for ``observe``, ``skip`` and ``recover`` (default probes and
detectors; a run store on disk; recover with `RecoveryConfig`'s default snapshots), plus the bare trainer again as
the A/A control. A step is everything the framework does per update (its data loader, hooks, logging; keel's
work). The method (whole-trainer blocks taking turns, medians of per-repeat ratios): `keel.harness.bench._blocks`.
All blocks share one process (a framework's import costs seconds).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from keel._core.validate import check_types, require_choices, require_ints
from keel.harness.bench._blocks import (
    CONTROL,
    add_block_arguments,
    bench_each,
    config_from_args,
    guard_summary,
    intervals,
    print_rows,
)
from keel.harness.bench._progress import bench_progress
from keel.recover import Policy

FRAMEWORKS = ("hf", "lightning")
NEEDS = {"hf": ("transformers", "pip install 'keel[hf]'"), "lightning": ("lightning", "pip install 'keel[lightning]'")}


@dataclass(kw_only=True)
class IntegrationsBenchConfig:
    """Settings of the integrations benchmark.

    Attributes:
        frameworks: Which trainers to time: ``hf`` (transformers' ``Trainer``), ``lightning``.
        steps: Timed optimizer steps per block (30: one default ``recover`` snapshot falls inside).
        warmup: Untimed steps first in every block (the callback builds its Guard when training begins).
        repeats: Blocks per variant and framework.
        hidden_size: The Llama's width (2 layers, 4 heads).
        batch_size: Sequences per step.
        seq_len: Bytes per sequence.
    """

    frameworks: tuple[str, ...] = FRAMEWORKS
    steps: int = 30
    warmup: int = 5
    repeats: int = 5
    hidden_size: int = 64
    batch_size: int = 8
    seq_len: int = 64

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "steps", "warmup", "repeats", "hidden_size", "batch_size", "seq_len")
        require_choices(self, "frameworks", FRAMEWORKS)
        if self.hidden_size % 4:
            raise ValueError(
                f"IntegrationsBenchConfig.hidden_size={self.hidden_size}; allowed: a multiple of 4 (4 heads)"
            )

    @classmethod
    def quick(cls, **overrides: Any) -> IntegrationsBenchConfig:
        """The smallest useful run (``--quick``, the tests): a 16-wide model, short blocks, 2 repeats."""
        return cls(
            **{"steps": 4, "warmup": 2, "repeats": 2, "hidden_size": 16, "batch_size": 2, "seq_len": 16} | overrides
        )


def missing_extra(frameworks: tuple[str, ...]) -> str | None:
    """The install command of the first framework in ``frameworks`` that is not installed; None if all are."""
    for framework in frameworks:
        module, extra = NEEDS[framework]
        if importlib.util.find_spec(module) is None:
            return (
                f"keel bench integrations --framework {framework} times {module}'s own Trainer; allowed: with it "
                f"installed ({extra})"
            )
    return None


def time_block(framework: str, policy: Policy | None, config: IntegrationsBenchConfig, workdir: Path) -> dict[str, Any]:
    """One block: a fresh ``framework`` trainer, bare or with keel's callback under ``policy``, trained warm-up +
    timed steps. Returns its timed step times and what the Guard did."""
    from keel.harness.bench._integrations_tiny import StepMarks, TinyRun, quiet, train_hf, train_lightning

    # one step more than timed: the last timed step ends where the next one begins
    run = TinyRun(
        hidden_size=config.hidden_size,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        steps=config.warmup + config.steps + 1,
    )
    marks = StepMarks()
    callback: Any = None
    if policy is not None:
        if framework == "hf":
            from keel.integrations.hf import KeelCallback as HfCallback

            callback = HfCallback(run_dir=str(workdir / "keel"), policy=policy)
        else:
            from keel.integrations.lightning import KeelCallback as LightningCallback

            callback = LightningCallback(run_dir=str(workdir / "keel"), policy=policy)
    train = train_hf if framework == "hf" else train_lightning
    with quiet():
        train(run, workdir / "trainer", [] if callback is None else [callback], marks)
    block: dict[str, Any] = {
        "times": intervals(marks.begins, config.warmup),
        "cpu_times": intervals(marks.cpu, config.warmup),
    }
    if callback is not None:
        assert callback.guard is not None
        block["guard"] = guard_summary(callback.guard)
    return block


def bench_integrations(
    config: IntegrationsBenchConfig | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Time every variant of every framework in ``config``. Returns the figures as a dict.

    Raises:
        ValueError: a framework is not installed (checked before any training).
    """
    config = config or IntegrationsBenchConfig()
    if (message := missing_extra(config.frameworks)) is not None:
        raise ValueError(message)
    result: dict[str, Any] = {"config": asdict(config), "threads": torch.get_num_threads()}
    return result | {"frameworks": bench_each(config.frameworks, time_block, config, progress)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, quick = IntegrationsBenchConfig(), IntegrationsBenchConfig.quick()
    parser.add_argument(
        "--framework",
        nargs="+",
        default=list(FRAMEWORKS),
        choices=FRAMEWORKS,
        metavar="FRAMEWORK",
        help="whose Trainer to time: hf (transformers), lightning (default: both)",
    )
    add_block_arguments(
        parser, defaults, quick, per="framework", quick_help="a 16-wide model, short blocks (a smoke run)"
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(IntegrationsBenchConfig, args, frameworks=tuple(args.framework))
    if (message := missing_extra(config.frameworks)) is not None:  # one line before the progress bar
        raise ValueError(message)
    torch.set_num_threads(args.threads)
    total = len(config.frameworks) * config.repeats
    with bench_progress(total, "keel bench integrations", enabled=not args.json) as progress:
        result = bench_integrations(config, progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"keel's Trainer callbacks, Llama d={config.hidden_size} x2 layers, batch {config.batch_size}x"
        f"{config.seq_len} bytes, {torch.get_num_threads()} thread(s); {config.repeats} repeats x {config.steps} "
        "steps per variant, interleaved"
    )
    for framework, figures in result["frameworks"].items():
        print_rows(framework, figures, CONTROL, width=9)
    return 0
