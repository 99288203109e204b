"""`keel bench overhead`: the step-time cost of `Guard` on a proxy model, against the bare loop.

Identical copies of the model train in variants: bare (no keel), under `Guard` with the default probes, under
``policy="observe"`` with the full per-parameter probes every ``full_log_every`` steps, and under each policy
asked for (``--policy skip recover``: default probes, `RecoveryConfig`'s default snapshots). Each variant runs in
a process of its own — a variant can change its whole process (the copy thread of ``recover`` once slowed every
parallel op of the process it ran in, the bare loop's too, where an in-process comparison could not see it) —
and they take turns: one block of steps each, in rotating order, per repeat, so machine noise hits all alike.
Each repeat gives a ratio to the bare loop's time in the same repeat; the figure is the median over all rounds.
A process's own speed is a random draw too (on the 2-core VM one bare process ran 10 % faster than another for
its whole life), so the variants' processes are started afresh each round, and a second bare process runs as
the A/A control: its ratio is the method's own noise. Two ratios per variant: over the block's total time
(snapshot steps included) and of the block's median step (the steady state between snapshots).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from keel._core.argtypes import device, int_range, positive_int
from keel._core.errors import TrainingAborted
from keel._core.validate import check_types, require_ints
from keel.detect import OpposingSignalsDetector, SourceDriftDetector, default_detectors
from keel.guard import Guard
from keel.guard.console import silenced
from keel.harness.bench._compile_warmup import compile_warmup_steps, graphs_compiled
from keel.harness.bench._progress import bench_progress
from keel.harness.bench.cli import reject_unused
from keel.harness.bench.loop import example_lm_losses, train_steps
from keel.harness.bench.rl_signals import KINDS, SignalKind, rl_signal_source
from keel.integrations.watch import Watch, watch
from keel.proxy import ProxyBatches, create_proxy_model, list_proxy_sizes
from keel.recover.recovery import RecoveryConfig
from keel.signals import DEFAULT_PROBES, OpposingSignalsProbe, SourceGradientsProbe, source_losses
from keel.signals.attribution import Attribution

Policy = Literal["observe", "skip", "recover"]
WATCH = "keel.watch"  # the variant's marker among its Guard arguments
EVERY_UPDATE = "check_weights=every_update"
EVERY_UPDATE_CONFIG = RecoveryConfig(check_weights="every_update")
SIGNALS = (
    "keel.signals"  # the marker of an RL loop's variant: its kind of signals= dict (keel.harness.bench.rl_signals)
)
BATCH_IDS = "keel.batch_ids"  # the marker of the variant whose loop passes batch_ids= and batch= (with an Attribution)
OPPOSING = "keel.opposing"  # the marker of the variant with an OpposingSignalsProbe: its cadence
SOURCES = "keel.sources"  # the marker of a source-drift variant: its SourceGradientsProbe's cadence (0: none)
CONTROL = "bare, second process"  # the A/A control: the bare loop again, in a process of its own
AUTOCAST = {None: None, "bf16": torch.bfloat16}  # --autocast: the forward's dtype


@dataclass(kw_only=True)
class OverheadConfig:
    """Settings of the overhead benchmark.

    Attributes:
        size: Proxy model size.
        batch_size: Sequences per step.
        seq_len: Bytes per sequence.
        steps: Steps per timed block (25: one default ``recover`` snapshot per block).
        repeats: Timed blocks per variant and round.
        rounds: Fresh processes per variant, one after another (the figure is the median of the per-block ratios
            of all rounds): a process's own speed differs from another's by up to ~10 % on a small machine.
        warmup: Untimed steps per variant first.
        full_log_every: ``log_every`` of the full-probe variant.
        policies: Also time `Guard(policy=p)` with the default probes for each of these; with ``recover``, also
            ``RecoveryConfig(check_weights="every_update")`` (the weights read after every update).
        watch: Also time ``keel.watch(model, optimizer, policy="skip")`` on the loop as it is (its
            ``optimizer.step()`` hooked, the loss taken from the backward), and ``keel.watch`` under each other
            policy of ``policies``.
        signals: Also time `Guard` with an RL loop's ``signals=`` dict and detectors, per kind (``pref``, ``rl``:
            `keel.harness.bench.rl_signals`).
        batch_ids: Also time `Guard` with ``guard.step(loss, batch_ids=ids, batch=(x, y))`` and a `keel.Attribution`
            (per-sequence losses): the data path of issue 17 on steps with no finding.
        opposing_every: Also time `Guard` with the default probes plus an `OpposingSignalsProbe` on 32 fixed
            held-out sequences measured every this many steps, and the `OpposingSignalsDetector` (0: not timed).
        source_drift_every: Also time `Guard` with the `SourceDriftDetector` on three sources (a batch's rows
            modulo 3), the loop passing ``signals=keel.signals.source_losses(losses, tags)`` from its own
            per-sequence losses every step; and that plus a `SourceGradientsProbe` (loss and cosine) every this
            many steps, the loop passing ``batch=`` (0: not timed).
        device: ``cpu`` or ``cuda``.
        compile: Every variant trains ``torch.compile(model)`` (the default backend, inductor); the Guard gets the
            model itself, as a user's loop gives it (its hooks are the compiled module's). Each variant first warms
            one whole period of its probes' cadences (`keel.harness.bench._compile_warmup`: a cadenced probe's step
            has a graph of its own, compiled once), and ``graphs_compiled_timed`` counts those compiled inside the
            timed blocks.
        autocast: ``"bf16"``: every variant's forward and loss under ``torch.autocast(device, torch.bfloat16)``
            (parameters and optimizer in float32, as PyTorch's AMP recipe has them); None: float32.
    """

    size: str = "small"
    batch_size: int = 16
    seq_len: int = 64
    steps: int = 25
    repeats: int = 7
    rounds: int = 3
    warmup: int = 5
    full_log_every: int = 1
    policies: tuple[Policy, ...] = ()
    watch: bool = False
    signals: tuple[SignalKind, ...] = ()
    batch_ids: bool = False
    opposing_every: int = 0
    source_drift_every: int = 0
    device: str = "cpu"
    compile: bool = False
    autocast: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "batch_size", "seq_len", "steps", "repeats", "rounds", "full_log_every")
        require_ints(self, "opposing_every", "source_drift_every", minimum=0)
        self.policies = tuple(dict.fromkeys(self.policies))
        self.signals = tuple(dict.fromkeys(self.signals))
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"OverheadConfig.device={self.device!r}; allowed: cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("OverheadConfig.device='cuda' but no CUDA device is available; allowed: cpu")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"OverheadConfig.autocast={self.autocast!r}; allowed: {', '.join(map(str, AUTOCAST))}")
        if (self.compile or self.autocast) and self.source_drift_every:
            raise ValueError(
                "OverheadConfig.source_drift_every with compile or autocast: the source-drift loop keeps each "
                "sequence's loss itself; allowed: one of them"
            )

    def variants(self) -> dict[str, dict[str, Any] | None]:
        """Variant name → `Guard` arguments (None: the bare loop)."""
        variants: dict[str, dict[str, Any] | None] = {
            "bare": None,
            "default": {},
            "full": {"policy": "observe", "probes": "full", "log_every": self.full_log_every},
        }
        variants.update({f"policy={p}": {"policy": p} for p in self.policies})
        if "recover" in self.policies:  # the weights read after every update, not only the unproven ones
            variants[f"policy=recover, {EVERY_UPDATE}"] = {"policy": "recover", "recovery": EVERY_UPDATE_CONFIG}
        if self.watch:
            for p in dict.fromkeys(("skip", *self.policies)):
                variants[f"watch, policy={p}"] = {"policy": p, WATCH: True}
        variants.update({f"signals={kind}": {SIGNALS: kind} for kind in self.signals})
        if self.batch_ids:
            variants["batch ids, attribution"] = {BATCH_IDS: True}
        if self.opposing_every:
            variants[f"opposing/{self.opposing_every}"] = {OPPOSING: self.opposing_every}
        if self.source_drift_every:
            variants["sources, step losses"] = {SOURCES: 0}
            variants[f"sources + probe/{self.source_drift_every}"] = {SOURCES: self.source_drift_every}
        variants[CONTROL] = None
        return variants


def _make_loop(config: OverheadConfig, guard_kwargs: dict | None, run_dir: str | None) -> Callable[[int], None]:
    torch.manual_seed(0)
    model = create_proxy_model(config.size, seq_len=config.seq_len).to(config.device)
    # 3e-4: a recipe that trains. At 1e-3 (unclipped, no warm-up) the small proxy fell from 5.6 to 2.9 and climbed
    # back past 5.5 by step ~120: keel rightly called it a divergence, and the recover variant timed its rollbacks
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=True)
    batches = ProxyBatches(batch_size=config.batch_size, seq_len=config.seq_len, seed=0)
    # a fresh batch for every step: cycling a few, the large proxy memorises them within a few hundred steps, its
    # gradient norm falls 100-fold and bounces back — spikes the skip policy acts on, so the loops would differ
    steps = config.warmup + config.repeats * config.steps
    data = [(x.to(config.device), y.to(config.device)) for x, y in (batches.next() for _ in range(steps))]
    kwargs = dict(guard_kwargs or {})
    watched = kwargs.pop(WATCH, False)
    signals = None
    if (kind := kwargs.pop(SIGNALS, None)) is not None:
        kwargs["detectors"], signals = rl_signal_source(kind, config.batch_size, config.seq_len, config.device)
    with_ids = kwargs.pop(BATCH_IDS, False)
    if with_ids:
        kwargs["attribution"] = Attribution(loss_fn=example_lm_losses)
    if every := kwargs.pop(OPPOSING, 0):
        kwargs["probes"], kwargs["detectors"] = opposing_signals_watch(config, every)
    example_signals = None
    if (every := kwargs.pop(SOURCES, None)) is not None:
        kwargs["probes"], kwargs["detectors"], example_signals = source_drift_watch(config, every)
        with_ids = every > 0  # the probe measures on the step's batch
    loss_fn = precision_loss(model, config)
    guard: Guard | Watch | None = None
    if watched:  # the loop stays bare; keel hooks its optimizer.step()
        guard = watch(model, opt, run_dir=run_dir, **kwargs)
    elif guard_kwargs is not None:
        guard = Guard(model, opt, run_dir=run_dir, **kwargs)
    stepper = guard if isinstance(guard, Guard) else None

    position = 0

    def run(n: int) -> None:  # the next n batches: a block of single steps must not repeat the first batch
        nonlocal position
        start, size = position, config.batch_size
        ids = (lambda k: range((start + k) * size, (start + k + 1) * size)) if with_ids else None
        batches = [data[(position + k) % len(data)] for k in range(n)]
        train_steps(model, opt, batches, stepper, n, signals, ids, example_signals, loss_fn)
        position += n

    run.guard = guard  # type: ignore[attr-defined]
    return run


def precision_loss(model: torch.nn.Module, config: OverheadConfig) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The loop's loss through ``torch.compile(model)`` and/or under bf16 autocast (None: the plain loop's)."""
    if not (config.compile or config.autocast):
        return None
    forward = torch.compile(model) if config.compile else model
    dtype = AUTOCAST[config.autocast]

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(config.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return loss_fn


def opposing_signals_watch(config: OverheadConfig, every: int) -> tuple[list, list]:
    """The default probes plus an `OpposingSignalsProbe` on 32 fixed held-out sequences, and the default detectors
    plus the `OpposingSignalsDetector`: the probes= and detectors= of the ``opposing/EVERY`` variant."""
    x, y = ProxyBatches(batch_size=32, seq_len=config.seq_len, seed=1, split="val").next()
    probe_set = (x.to(config.device), y.to(config.device))
    probe = OpposingSignalsProbe(probe_set=probe_set, loss_fn=example_lm_losses, every=every)
    return [*DEFAULT_PROBES, probe], [*default_detectors(), OpposingSignalsDetector()]


def source_drift_watch(config: OverheadConfig, every: int) -> tuple[list, list, Callable[[Tensor], dict]]:
    """The ``sources`` variants' probes=, detectors= and the loop's signals= maker: three sources (rows modulo 3),
    the `SourceDriftDetector`, and with ``every`` > 0 a `SourceGradientsProbe` (loss and cosine) every ``every``."""
    tags = [row % 3 for row in range(config.batch_size)]
    probes: list[Any] = list(DEFAULT_PROBES)  # probe names, and the probe object
    if every:
        probes.append(SourceGradientsProbe(source_fn=lambda _: tags, loss_fn=example_lm_losses, every=every))
    return probes, [*default_detectors(), SourceDriftDetector()], lambda losses: source_losses(losses, tags)


def _variant_process(conn: Connection, config: dict[str, Any], guard_kwargs: dict | None, run_dir: str) -> None:
    """One variant in its own process: times a block of single steps per request; None ends it."""
    with silenced():  # the benchmark's figures are its output; a run's summary at close would only interleave
        _serve_variant(conn, OverheadConfig(**config), guard_kwargs, run_dir)


def _serve_variant(conn: Connection, cfg: OverheadConfig, guard_kwargs: dict | None, run_dir: str) -> None:
    loop = _make_loop(cfg, guard_kwargs, run_dir if guard_kwargs is not None else None)
    loop(compile_warmup_steps(loop.guard, cfg.warmup) if cfg.compile else cfg.warmup)  # type: ignore[attr-defined]
    conn.send("ready")
    while (n := conn.recv()) is not None:
        times, cpu, graphs = [], time.process_time(), graphs_compiled()
        try:
            for _ in range(n):
                start = time.perf_counter()
                loop(1)
                times.append(time.perf_counter() - start)
        except TrainingAborted as exc:  # the variant's own training went wrong: say so, not a broken pipe
            conn.send(exc)
            return
        # and the block's CPU time (all the process's threads), and the graphs compiled inside it (ideally none)
        conn.send((times, time.process_time() - cpu, graphs_compiled() - graphs))
    guard = loop.guard  # type: ignore[attr-defined]
    stats: dict[str, Any] = {}
    if guard is not None:
        ring = guard.recovery.ring if guard.recovery is not None else None
        guard.close()
        if ring is not None:
            stats = {"snapshots": len(ring.snapshots), "blocked_ms_total": 1e3 * ring.blocked_s}
    conn.send(stats)


def bench_overhead(config: OverheadConfig | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Measure Guard's step-time ratios against the bare loop. Returns the figures as a dict."""
    config = config or OverheadConfig()
    variants = config.variants()
    times: dict[str, list[list[float]]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    round_ratios: dict[str, list[float]] = {name: [] for name in variants if name != "bare"}
    stats: dict[str, Any] = {}
    compiled = dict.fromkeys(variants, 0)
    for r in range(config.rounds):
        label = f"round {r + 1}/{config.rounds}, "
        round_times, round_cpu, round_compiled, stats = _timed_round(config, variants, progress, label)
        compiled = {name: compiled[name] + round_compiled[name] for name in variants}
        for name, blocks in round_times.items():
            times[name] += blocks
            cpu[name] += round_cpu[name]
            if name != "bare":
                round_ratios[name].append(_median_ratio(blocks, round_times["bare"], sum))

    def ratios(of: Callable[[list[float]], float]) -> dict[str, float]:
        return {name: _median_ratio(times[name], times["bare"], of) for name in variants if name != "bare"}

    result: dict[str, Any] = {
        "ratio": ratios(sum),
        "ratio_steady": ratios(statistics.median),
        # CPU time, which other work on a shared machine disturbs far less than wall time (not a device's time)
        "ratio_cpu": {
            name: statistics.median(c / b for c, b in zip(cpu[name], cpu["bare"], strict=True))
            for name in variants
            if name != "bare"
        },
        "ratio_rounds": round_ratios,
        "step_ms": {
            name: 1e3 * statistics.median(sum(block) / len(block) for block in ts) for name, ts in times.items()
        },
        "snapshots": {name: s for name, s in stats.items() if s.get("snapshots")},
        # graphs dynamo captured inside the timed blocks of all rounds: a compile there would be timed as a step
        "graphs_compiled_timed": compiled,
        "config": asdict(config),
        "threads": torch.get_num_threads(),
        "isolated": "one process per variant",
    }
    result["control"] = result["ratio"].pop(CONTROL)
    result["ratio_steady"].pop(CONTROL)
    result["control_cpu"] = result["ratio_cpu"].pop(CONTROL)
    result["control_rounds"] = round_ratios.pop(CONTROL)
    result["step_ms"].pop(CONTROL)
    result["ratio_default"], result["ratio_full"] = result["ratio"]["default"], result["ratio"]["full"]
    return result


def _median_ratio(blocks: list[list[float]], bare: list[list[float]], of: Callable[[list[float]], float]) -> float:
    return statistics.median(of(t) / of(b) for t, b in zip(blocks, bare, strict=True))


def _timed_round(
    config: OverheadConfig,
    variants: dict[str, dict[str, Any] | None],
    progress: Callable[[str], None] | None,
    label: str,
) -> tuple[dict[str, list[list[float]]], dict[str, list[float]], dict[str, int], dict]:
    """One round: a fresh process per variant, `config.repeats` interleaved blocks each. Returns the block times,
    CPU times and graphs compiled inside them, and each process's closing stats."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        pipes, procs = {}, []
        for i, (name, kwargs) in enumerate(variants.items()):
            ours, theirs = context.Pipe()
            proc = context.Process(
                target=_variant_process,
                args=(theirs, asdict(config), kwargs, f"{tmp}/{i}"),
                name=f"keel-bench-{name}",
                daemon=True,
            )
            proc.start()
            pipes[name] = ours
            procs.append(proc)
        try:
            for conn in pipes.values():
                _receive(conn, procs)
            times: dict[str, list[list[float]]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            compiled = dict.fromkeys(variants, 0)
            names = list(variants)
            for r in range(config.repeats):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:  # rotate the order each repeat
                    pipes[name].send(config.steps)
                    block, cpu_s, graphs = _receive(pipes[name], procs)
                    times[name].append(block)
                    cpu[name].append(cpu_s)
                    compiled[name] += graphs
                if progress is not None:
                    progress(f"{label}repeat {r + 1}/{config.repeats}")
            stats = {}
            for name, conn in pipes.items():
                conn.send(None)
                stats[name] = _receive(conn, procs)
        finally:
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
    return times, cpu, compiled, stats


def _receive(conn: Connection, procs: Sequence[multiprocessing.process.BaseProcess]) -> Any:
    """The next message from a variant's process, or a clear error if one died."""
    while not conn.poll(1.0):
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            raise RuntimeError(
                f"bench overhead: the variant process {dead[0].name} exited with code "
                f"{dead[0].exitcode} (see its traceback above)"
            )
    message = conn.recv()
    if isinstance(message, TrainingAborted):
        raise TrainingAborted(
            f"bench overhead: a variant's training was aborted by keel, so its steps are not comparable: {message}",
            message.decision,
        ) from None
    return message


# what `keel bench overhead --ddp` does not read (keel.harness.bench.ddp), and what it times instead
DDP_UNUSED = (
    "watch",
    "signals",
    "batch_ids",
    "policy",
    "opposing_signals",
    "source_drift",
    "full_log_every",
    "compile",
    "autocast",
    "rounds",
)
DDP_TIMES = "it times bare DDP against Guard.step(loss) with the default probes, eager float32, in one torchrun"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = OverheadConfig()
    parser.add_argument(
        "--size", default=defaults.size, choices=list_proxy_sizes(), help="proxy model size (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=positive_int, default=defaults.seq_len)
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="steps per timed block")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=defaults.repeats,
        help="timed blocks per variant and round (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=None,
        help=f"fresh processes per variant, one round after another (default: {defaults.rounds}; not with --ddp)",
    )
    parser.add_argument(
        "--full-log-every",
        type=positive_int,
        default=None,
        help=f"log_every of the full-probe variant (default: {defaults.full_log_every}; not with --ddp)",
    )
    parser.add_argument(
        "--policy",
        nargs="+",
        default=[],
        choices=["observe", "skip", "recover"],
        metavar="POLICY",
        help="also time Guard(policy=...) with the default probes for each (observe, skip, recover)",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="also time keel.watch(model, optimizer, policy=P) on the bare loop, for skip and each --policy",
    )
    parser.add_argument(
        "--signals",
        nargs="+",
        default=[],
        choices=KINDS,
        metavar="KIND",
        help="also time Guard.step(loss, signals=...) with an RL loop's dict and detectors: pref (DPO), rl (GRPO)",
    )
    parser.add_argument(
        "--batch-ids",
        action="store_true",
        help="also time Guard.step(loss, batch_ids=..., batch=...) with a keel.Attribution (issue 17's data path)",
    )
    parser.add_argument(
        "--opposing-signals",
        type=positive_int,
        default=None,
        metavar="EVERY",
        help="also time the default probes plus OpposingSignalsProbe (32 held-out sequences) every EVERY steps",
    )
    parser.add_argument(
        "--source-drift",
        type=positive_int,
        default=None,
        metavar="EVERY",
        help="also time SourceDriftDetector on 3 sources from the loop's per-source losses (source_losses), and "
        "that plus SourceGradientsProbe every EVERY steps",
    )
    parser.add_argument("--device", default=defaults.device, type=device("cpu", "cuda"), metavar="{cpu,cuda}")
    parser.add_argument(
        "--compile", action="store_true", help="every variant trains torch.compile(model) (inductor; not with --ddp)"
    )
    parser.add_argument(
        "--autocast",
        choices=["bf16"],
        default=None,
        help="every variant's forward and loss under torch.autocast(device, bfloat16) (not with --ddp)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--ddp",
        type=int_range(2),
        default=None,
        metavar="N",
        help="measure under DDP with N >= 2 torchrun ranks instead (keel.harness.bench.ddp)",
    )


def main(args: argparse.Namespace) -> int:
    if args.ddp is not None:
        reject_unused(args, DDP_UNUSED, f"with --ddp ({DDP_TIMES})")
        from keel.harness.bench.ddp import main as ddp_main

        return ddp_main(args)
    defaults = OverheadConfig()
    full_log_every = defaults.full_log_every if args.full_log_every is None else args.full_log_every
    config = OverheadConfig(
        size=args.size,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        repeats=args.repeats,
        rounds=defaults.rounds if args.rounds is None else args.rounds,
        full_log_every=full_log_every,
        policies=tuple(args.policy),
        watch=args.watch,
        signals=tuple(args.signals),
        batch_ids=args.batch_ids,
        opposing_every=args.opposing_signals or 0,
        source_drift_every=args.source_drift or 0,
        device=args.device,
        compile=args.compile,
        autocast=args.autocast,
    )
    with bench_progress(config.rounds * config.repeats, "keel bench overhead", enabled=not args.json) as progress:
        result = bench_overhead(config, progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ms, ratio, steady = result["step_ms"], result["ratio"], result["ratio_steady"]
    print(
        f"proxy {config.size}, batch {config.batch_size}x{config.seq_len}, {config.device}"
        f"{', compiled' if config.compile else ''}{', bf16 autocast' if config.autocast else ''}, "
        f"{config.rounds} rounds x {config.repeats} repeats x {config.steps} steps, one process per variant and "
        f"round, interleaved"
    )
    labels = {"default": "Guard default", "full": f"observe, full probes/{config.full_log_every}"}
    labels |= {name: labels.get(name, "Guard " + name) for name in ratio}
    width = max(22, *(len(label) + 1 for label in labels.values()))
    print(f"  {'variant':{width}s}{'ms/step':>9s}{'ratio':>9s}{'steady':>9s}{'cpu':>9s}")
    print(f"  {'bare loop':{width}s}{ms['bare']:9.2f}")
    for name in ratio:
        cpu = result["ratio_cpu"][name]
        print(f"  {labels[name]:{width}s}{ms[name]:9.2f}{ratio[name]:9.4f}{steady[name]:9.4f}{cpu:9.4f}")
    control = f"{result['control']:9.4f}{'':9s}{result['control_cpu']:9.4f}"
    print(f"  {'control: bare again':{width}s}{'':9s}{control}   (the method's own noise: ideally 1)")
    for name, snap in result["snapshots"].items():
        print(f"  {name}: {snap['snapshots']} snapshots in the ring, {snap['blocked_ms_total']:.1f} ms blocked in all")
    if config.compile:  # each variant warmed one whole period of its probes' cadences first (_compile_warmup)
        graphs = ", ".join(f"{name} {n}" for name, n in result["graphs_compiled_timed"].items())
        print(f"  graphs compiled inside the timed blocks (ideally 0 each): {graphs}")
    return 0
