"""`keel bench trl`: what `guard_trainer` costs a real TRL ``DPOTrainer`` and ``GRPOTrainer`` step, per policy.

Each trainer (a small Qwen2 built from a config, on the proxy corpus: `keel.harness.bench._trl_tiny`) trains in
variants: bare (no keel), and under ``guard_trainer(trainer, policy=p)`` for ``observe``, ``skip`` and
``recover`` (default probes and detectors, the trainer's preset included; a run store on disk; recover with
`RecoveryConfig`'s default snapshots), plus the bare trainer again as the A/A control (its ratio is the method's
own noise). A block is one fresh trainer of ``warmup + steps`` steps, the same weights, data and seeds each time;
its step times are the intervals between the Trainer's ``on_step_begin`` events after the warm-up, so a step is
everything the Trainer does per update (GRPO's generation, the reward, logging every 10 steps, keel's work). The
variants take turns, one block each in rotating order per repeat, so machine noise hits all alike; each repeat
gives a ratio to the bare block of the same repeat and the figure is the median over repeats. Three ratios: over
the block's total time (recover's snapshot steps included), of the block's median step (the steady state), and of
the block's CPU time (the process's, all threads: keel's store writer and snapshot copy count), which a machine
shared with other work disturbs far less than wall time.

All variants share one process (a TRL import costs seconds; the copy thread of ``recover`` no longer slows its
process, see `keel bench overhead`), and the A/A control would show a variant that slowed the ones after it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
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

TRAINERS = ("dpo", "grpo")
EXTRA = "pip install 'keel[trl]'"


@dataclass(kw_only=True)
class TrlBenchConfig:
    """Settings of the TRL benchmark.

    Attributes:
        trainers: Which TRL trainers to time: ``dpo``, ``grpo``.
        steps: Timed optimizer steps per block (30: one default ``recover`` snapshot falls inside).
        warmup: Untimed steps first in every block (the Guard is built at the first step).
        repeats: Blocks per variant and trainer.
        hidden_size: The model's width (2 layers).
        batch_size: DPO pairs / GRPO completions per step (2 completions per prompt).
        text_chars: Characters (tokens) per prompt and per answer or completion.
    """

    trainers: tuple[str, ...] = TRAINERS
    steps: int = 30
    warmup: int = 5
    repeats: int = 5
    hidden_size: int = 64
    batch_size: int = 8
    text_chars: int = 16

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "steps", "repeats", "hidden_size", "batch_size", "text_chars")
        if isinstance(self.warmup, bool) or self.warmup < 1:
            raise ValueError(f"TrlBenchConfig.warmup={self.warmup!r}; allowed: an int >= 1 (the Guard's first step)")
        require_choices(self, "trainers", TRAINERS)
        if self.hidden_size % 4:
            raise ValueError(f"TrlBenchConfig.hidden_size={self.hidden_size}; allowed: a multiple of 4 (4 heads)")
        if self.batch_size % 2:
            raise ValueError(
                f"TrlBenchConfig.batch_size={self.batch_size}; allowed: an even number (GRPO: 2 completions a prompt)"
            )

    @classmethod
    def quick(cls, **overrides: Any) -> TrlBenchConfig:
        """The smallest useful run (``--quick``, the tests): the tests' tiny model, short blocks, 2 repeats."""
        return cls(
            **{"steps": 6, "warmup": 2, "repeats": 2, "hidden_size": 16, "batch_size": 2, "text_chars": 6} | overrides
        )


def time_block(kind: str, policy: Policy | None, config: TrlBenchConfig, workdir: Path) -> dict[str, Any]:
    """One block: a fresh ``kind`` trainer, bare or under ``guard_trainer(policy=...)``, trained warm-up + timed
    steps. Returns its timed step times and what the Guard did."""
    from keel.harness.bench._trl_tiny import StepTimer, TinyModel, build_trainer, quiet
    from keel.integrations.trl import guard_trainer

    timer = StepTimer()
    model = TinyModel(hidden_size=config.hidden_size, batch_size=config.batch_size, text_chars=config.text_chars)
    # TRL's and transformers' prints and bars are not the benchmark's output
    with quiet(), contextlib.redirect_stdout(io.StringIO()):
        # one step more than timed: the last timed step ends where the next one begins
        trainer = build_trainer(kind, model, config.warmup + config.steps + 1, workdir / "trainer", [timer])
        callback = None if policy is None else guard_trainer(trainer, run_dir=str(workdir / "keel"), policy=policy)
        trainer.train()
    block: dict[str, Any] = {
        "times": intervals(timer.begins, config.warmup),
        "cpu_times": intervals(timer.cpu, config.warmup),
    }
    if callback is not None:
        assert callback.guard is not None
        block["guard"] = guard_summary(callback.guard)
    return block


def bench_trl(config: TrlBenchConfig | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every variant of every trainer in ``config``. Returns the figures as a dict.

    Raises:
        ValueError: trl is not installed (checked before any training).
    """
    if importlib.util.find_spec("trl") is None:
        raise ValueError(f"keel bench trl times TRL's own trainers; allowed: with trl installed ({EXTRA})")
    config = config or TrlBenchConfig()
    result: dict[str, Any] = {"config": asdict(config), "threads": torch.get_num_threads()}
    return result | {"trainers": bench_each(config.trainers, time_block, config, progress)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrlBenchConfig()
    parser.add_argument(
        "--trainer",
        nargs="+",
        default=list(TRAINERS),
        choices=TRAINERS,
        metavar="TRAINER",
        help="which TRL trainers to time (default: dpo grpo)",
    )
    add_block_arguments(
        parser,
        defaults,
        TrlBenchConfig.quick(),
        per="trainer",
        quick_help="the tests' tiny model, short blocks (a smoke run)",
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(TrlBenchConfig, args, trainers=tuple(args.trainer))
    if importlib.util.find_spec("trl") is None:  # one line before the thread change and the progress bar
        raise ValueError(f"keel bench trl times TRL's own trainers; allowed: with trl installed ({EXTRA})")
    torch.set_num_threads(args.threads)
    total = len(config.trainers) * config.repeats
    with bench_progress(total, "keel bench trl", enabled=not args.json) as progress:
        result = bench_trl(config, progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"TRL trainers, Qwen2 d={config.hidden_size} x2 layers, batch {config.batch_size}, {config.text_chars}-char "
        f"texts, {torch.get_num_threads()} thread(s); {config.repeats} repeats x {config.steps} steps per variant, "
        "interleaved"
    )
    for kind, figures in result["trainers"].items():
        print_rows(kind, figures, CONTROL, width=5)
    return 0
