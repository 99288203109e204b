"""Whole-trainer blocks taking turns: the method of the benchmarks that time a framework's own training loop
(`keel bench trl`, `keel bench integrations`).

A block is one fresh trainer of warm-up + timed steps, bare or with keel, the same weights, data and seeds each time;
its step times are the intervals between the trainer's step-begin events after the warm-up. The variants take turns,
one block each in rotating order per repeat, so machine noise hits all alike; each repeat gives a ratio to the bare
block of the same repeat and the figure is the median over repeats. Three ratios: over the block's total time
(``recover``'s snapshot steps included), of its median step (the steady state), and of its CPU time (the process's,
all threads), which a machine shared with other work disturbs far less than wall time. The bare trainer runs again
as the A/A control: its ratio is the method's own noise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from keel._core.argtypes import cpu_threads, positive_int
from keel.guard.console import silenced
from keel.recover import POLICIES, Policy

CONTROL = "bare, again"  # the A/A control: the bare trainer in a block of its own

BlockTimer = Callable[[str, Path], dict[str, Any]]  # (variant, work folder) → {"times", "cpu_times"[, "guard"]}
# (trainer kind, its policy or None for bare, the bench's config, work folder) → one block's figures
KindTimer = Callable[[str, Policy | None, Any, Path], dict[str, Any]]


def policy_variants() -> dict[str, Any]:
    """Variant name → the policy keel runs under (None: the bare trainer), the A/A control last."""
    return {"bare": None} | {f"policy={p}": p for p in POLICIES} | {CONTROL: None}


def guard_summary(guard: Any) -> dict[str, Any]:
    """What a block's `Guard` did: its steps, its decisions' actions counted, the snapshots in its ring."""
    ring = guard.recovery.ring if guard.recovery is not None else None
    return {
        "steps": guard.global_step,
        "actions": dict(Counter(d.action for d in guard.decisions)),
        "snapshots": len(ring.snapshots) if ring is not None else 0,
    }


def intervals(marks: Sequence[float], warmup: int) -> list[float]:
    """The times between consecutive step-begin marks after the first ``warmup`` steps."""
    timed = marks[warmup:]
    return [b - a for a, b in zip(timed, timed[1:], strict=False)]


def interleaved_blocks(
    names: Sequence[str],
    time_block: BlockTimer,
    repeats: int,
    control: str,
    progress: Callable[[str], None] | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Time ``repeats`` blocks of every variant in ``names`` ("bare" among them, ``control`` the bare one again),
    in rotating order, after one untimed block (a process's first trainer runs slower). Returns the figures."""
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    cpu: dict[str, list[list[float]]] = {name: [] for name in names}
    guards: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        time_block("bare", Path(tmp) / "warm-up")
        for r in range(repeats):
            shift = r % len(names)
            for i, name in enumerate([*names[shift:], *names[:shift]]):  # rotate the order each repeat
                block = time_block(name, Path(tmp) / f"{r}-{i}")
                times[name].append(block["times"])
                cpu[name].append(block["cpu_times"])
                if "guard" in block:
                    guards.setdefault(name, []).append(block["guard"])
            if progress is not None:
                progress(f"{label}repeat {r + 1}/{repeats}")

    def ratios(clock: dict[str, list[list[float]]], of: Callable[[list[float]], float]) -> dict[str, float]:
        return {name: _median_ratio(clock[name], clock["bare"], of) for name in names if name != "bare"}

    ratio, steady, cpu_ratio = ratios(times, sum), ratios(times, statistics.median), ratios(cpu, sum)
    return {
        "step_ms": {name: 1e3 * statistics.median(sum(b) / len(b) for b in times[name]) for name in names},
        "cpu_ms": {name: 1e3 * statistics.median(sum(b) / len(b) for b in cpu[name]) for name in names},
        "ratio": {name: r for name, r in ratio.items() if name != control},
        "ratio_steady": {name: r for name, r in steady.items() if name != control},
        "ratio_cpu": {name: r for name, r in cpu_ratio.items() if name != control},
        "ratio_repeats": {
            name: [sum(t) / sum(b) for t, b in zip(times[name], times["bare"], strict=True)]
            for name in names
            if name != "bare"
        },
        "control": ratio[control],
        "control_steady": steady[control],
        "control_cpu": cpu_ratio[control],
        "guard": guards,
    }


def bench_each(
    kinds: Sequence[str], time_block: KindTimer, config: Any, progress: Callable[[str], None] | None
) -> dict[str, dict[str, Any]]:
    """Every trainer kind's figures: its `policy_variants` timed in `interleaved_blocks` of ``config.repeats``, with
    keel's run summaries silenced (they would interleave the figures)."""
    variants = policy_variants()
    figures: dict[str, dict[str, Any]] = {}
    with silenced():
        for kind in kinds:

            def block(name: str, workdir: Path, kind: str = kind) -> dict[str, Any]:
                return time_block(kind, variants[name], config, workdir)

            figures[kind] = interleaved_blocks(list(variants), block, config.repeats, CONTROL, progress, f"{kind} ")
    return figures


def config_from_args(cls: Any, args: argparse.Namespace, **chosen: Any) -> Any:
    """The bench config the command line asks for: ``cls.quick`` under ``--quick``, with ``--steps`` and
    ``--repeats`` where given and the ``chosen`` trainer kinds."""
    given = {k: v for k in ("steps", "repeats") if (v := getattr(args, k)) is not None}
    return cls.quick(**chosen, **given) if args.quick else cls(**chosen, **given)


def _median_ratio(blocks: list[list[float]], bare: list[list[float]], of: Callable[[list[float]], float]) -> float:
    return statistics.median(of(t) / of(b) for t, b in zip(blocks, bare, strict=True))


def print_rows(framework: str, figures: dict[str, Any], control: str, width: int) -> None:
    """The table rows of one trainer's figures (its name ``width`` wide): the bare trainer, each variant, the
    control."""
    header = f"{'variant':20s}{'ms/step':>9s}{'ratio':>9s}{'steady':>9s}{'cpu':>9s}  guard (last block)"
    print(f"  {framework:{width}s} {header}")
    print(f"  {'':{width}s} {'bare trainer':20s}{figures['step_ms']['bare']:9.2f}")
    rows = {name: (figures["step_ms"][name], name) for name in figures["ratio"]} | {
        control: (None, "control: bare again")
    }
    for name, (ms, label) in rows.items():
        keys = (
            ("ratio", "ratio_steady", "ratio_cpu") if name != control else ("control", "control_steady", "control_cpu")
        )
        values = [figures[k][name] if name != control else figures[k] for k in keys]
        blocks = figures["guard"].get(name)
        g = blocks[-1] if blocks else None
        told = f"  {g['steps']} steps, actions {g['actions']}, {g['snapshots']} snapshots" if g else "  (ideally 1)"
        step = f"{ms:9.2f}" if ms is not None else f"{'':9s}"
        print(f"  {'':{width}s} {label:20s}{step}" + "".join(f"{v:9.4f}" for v in values) + told)


def add_block_arguments(
    parser: argparse.ArgumentParser, defaults: Any, quick: Any, *, per: str, quick_help: str
) -> None:
    """The options every whole-trainer benchmark takes: ``--steps``, ``--repeats``, ``--quick``, ``--threads``,
    ``--json`` (``defaults`` and ``quick`` are its config and its quick config, for the help)."""
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"timed steps per block (default: {defaults.steps}; --quick: {quick.steps})",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"blocks per variant and {per} (default: {defaults.repeats}; --quick: {quick.repeats})",
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--threads",
        type=cpu_threads,
        default=1,
        help="torch threads (default: 1 — the models are small: more threads only contend)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
