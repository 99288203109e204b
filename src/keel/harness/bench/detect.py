"""`keel bench detect`: run the scenario zoo and score keel's detection.

For every scenario (`keel.harness.scenarios`): was the right kind detected (a warning or critical finding of
the expected kind), at which step, how many steps before the loss degraded (`keel.detect.lead_time`, against
the scenario's reference run with the fix applied when it has one), and — for healthy runs — how many
warning/critical findings there were (false alarms). For an instability with a known event step (poisoned
batch, LR spike, ...), any warning or critical finding before the event is a false alarm too.

Example:
    keel bench detect                     # all scenarios, a table
    keel bench detect --json              # the figures as JSON
    keel bench detect --only lr_spike --only data_outliers
    keel bench detect --probe-costs       # CPU cost per step of each opt-in probe, stabilizer, loss, ...
    keel bench detect --probe-costs --group stabilizers --group lora
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from keel._core.argtypes import cpu_threads, nonnegative_int, positive_int
from keel.detect.diagnosis import diagnose
from keel.detect.lead_time import degradation_step, lead_steps
from keel.guard.console import progress_bar, silenced
from keel.harness.bench._component_costs import GROUPS, OPT_IN_PROBES, selected_rows
from keel.harness.bench._progress import bench_progress
from keel.harness.bench.cli import reject_unused
from keel.harness.scenarios import create_scenario, list_scenarios


@dataclass(kw_only=True)
class ScenarioScore:
    """How keel did on one scenario (the ``--json`` record)."""

    name: str
    healthy: bool
    expected_kind: str | None
    detected: bool
    kind: str | None
    step: int | None
    lead_steps: int | None
    false_alarms: int
    degraded_step: int | None = None
    event_step: int | None = None
    lead_required: bool = False
    passed: bool = False
    alarms: list[list[Any]] = field(default_factory=list)
    diagnosis: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def score_scenario(name: str, *, seed: int = 0, steps: int | None = None, reference: bool = True) -> ScenarioScore:
    """Run one scenario (and its reference run) and score the findings."""
    scenario = create_scenario(name)
    spec = scenario.spec
    start = time.perf_counter()
    result = scenario.run(seed=seed, steps=steps)
    ref = scenario.reference(seed=seed, steps=steps) if reference and not spec.healthy else None
    wall = time.perf_counter() - start
    alarms = result.alarms()
    event = result.event_step
    if spec.healthy:
        false_alarms = len(alarms)
    else:  # before a known event nothing is wrong yet: any alarm there is a false one
        false_alarms = sum(1 for f in alarms if event is not None and f.step < event)
    expected = [f for f in alarms if f.kind == spec.expected_kind and (event is None or f.step >= event)]
    first = expected[0] if expected else (alarms[0] if alarms else None)
    degraded = None if spec.healthy else degradation_step(result.losses, ref, start=result.event_step or 0)
    step = first.step if first is not None else None
    detected = bool(expected)
    lead = lead_steps(step, degraded) if detected else None
    if spec.healthy:
        passed = false_alarms == 0
    else:
        early_enough = not spec.lead_required or (lead is not None and lead > 0)
        passed = detected and false_alarms == 0 and early_enough
    return ScenarioScore(
        name=name,
        healthy=spec.healthy,
        expected_kind=spec.expected_kind,
        detected=detected,
        kind=first.kind if first is not None else None,
        step=step,
        lead_steps=lead,
        false_alarms=false_alarms,
        degraded_step=degraded,
        event_step=result.event_step,
        lead_required=spec.lead_required,
        passed=passed,
        alarms=[[f.step, f.kind, f.severity] for f in alarms][:20],
        diagnosis=[d.summary() for d in diagnose(result.findings, losses=result.losses, reference_losses=ref)][:3],
        wall_s=round(wall, 2),
    )


def bench_detect(
    names: Sequence[str] | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    reference: bool = True,
    progress: Callable[[ScenarioScore], None] | None = None,
) -> dict[str, Any]:
    """Score every scenario (or ``names``). Returns ``{"scenarios": [...], "summary": {...}}``."""
    names = list(names) if names else list_scenarios()
    unknown = [n for n in names if n not in list_scenarios()]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; allowed: {', '.join(list_scenarios())}")
    scores = []
    for name in names:
        score = score_scenario(name, seed=seed, steps=steps, reference=reference)
        scores.append(score)
        if progress is not None:
            progress(score)
    unstable = [s for s in scores if not s.healthy]
    healthy = [s for s in scores if s.healthy]
    summary = {
        "instabilities": len(unstable),
        "detected": sum(s.detected for s in unstable),
        "lead_positive": sum(1 for s in unstable if s.lead_steps is not None and s.lead_steps > 0),
        "healthy": len(healthy),
        "false_alarms": sum(s.false_alarms for s in healthy),
        "passed": sum(s.passed for s in scores),
        "total": len(scores),
        "wall_s": round(sum(s.wall_s for s in scores), 1),
    }
    return {"scenarios": [asdict(s) for s in scores], "summary": summary, "seed": seed}


PROBE_COST_DEFAULTS = {"repeats": 7, "steps": 10}
ZOO_FLAGS = ("only", "seed", "no_reference")
PROBE_COST_FLAGS = ("repeats", "steps", "threads", "group")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        action="append",
        metavar="SCENARIO",
        choices=list_scenarios(),
        help=f"run only this scenario (repeatable); one of: {', '.join(list_scenarios())}",
    )
    parser.add_argument("--seed", type=nonnegative_int, default=None, help="seed of every run (default: 0)")
    parser.add_argument(
        "--no-reference",
        action="store_true",
        default=None,
        help="skip the reference runs (lead time then uses the run's own loss curve)",
    )
    parser.add_argument(
        "--probe-costs",
        action="store_true",
        help="instead: measure the CPU cost per step of each opt-in probe, stabilizer, quantizer, loss, remedy and "
        "Guard option on the small proxy",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"--probe-costs: interleaved repeats (default: {PROBE_COST_DEFAULTS['repeats']})",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"--probe-costs: steps per block (default: {PROBE_COST_DEFAULTS['steps']})",
    )
    parser.add_argument(
        "--threads", type=cpu_threads, default=None, help="--probe-costs: torch threads (default: torch's)"
    )
    parser.add_argument(
        "--group",
        action="append",
        choices=GROUPS,
        metavar="GROUP",
        help=f"--probe-costs: time only this group of rows and their baselines (repeatable); one of: "
        f"{', '.join(GROUPS)} (default: all)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def _row(s: ScenarioScore) -> str:
    def show(v: object) -> str:
        return "-" if v is None else str(v)

    what = "healthy" if s.healthy else s.expected_kind or ""
    detected = show(s.detected if not s.healthy else None)
    return (
        f"  {s.name:28s} {what:28s} {'PASS' if s.passed else 'FAIL'}  detected={detected:5s}"
        f" step={show(s.step):5s} degraded={show(s.degraded_step):5s} lead={show(s.lead_steps):5s}"
        f" false_alarms={s.false_alarms}  ({s.wall_s:.1f}s)"
    )


def main(args: argparse.Namespace) -> int:
    if args.probe_costs:
        reject_unused(args, ZOO_FLAGS, "with --probe-costs")
        repeats = args.repeats or PROBE_COST_DEFAULTS["repeats"]
        with bench_progress(repeats, "keel bench detect --probe-costs", enabled=not args.json) as progress:
            with silenced():  # a healthy observing run's summary at close is not this benchmark's output
                costs = probe_costs(
                    steps=args.steps or PROBE_COST_DEFAULTS["steps"],
                    repeats=repeats,
                    threads=args.threads,
                    groups=tuple(dict.fromkeys(args.group)) if args.group else None,
                    progress=progress,
                )
        if args.json:
            print(json.dumps(costs, indent=2))
        else:
            print(
                f"  {'variant':40s} {'every':>5s} {'ms/step':>8s} {'ratio':>7s} {'+ms/meas.':>9s} "
                f"{'+% of bare step at its cadence':>31s}  against (ratio, +ms)"
            )
            for name, ms in costs["cpu_ms_per_step"].items():
                every = costs["default_every"].get(name)
                amortized = costs["amortized_fraction_of_bare"].get(name)
                ratio = costs["ratio_to_bare"][name]
                print(
                    f"  {name:40s} {every if every else '':>5} {ms:8.2f} {ratio:7.3f} "
                    f"{costs['extra_ms_vs_foundation'][name]:+9.2f} "
                    + (f"{100 * amortized:+30.2f}%" if amortized is not None else f"{'':31s}")
                    + "  {}, {}".format(*costs["against"][name])
                )
            for name, why in costs["skipped"].items():
                print(f"  {name:40s} skipped: {why}")
            for setting, s in costs["sharpness"].items():
                print(
                    f"  sharpness ({setting}): {s['s_per_measurement']:.2f} s per measurement = "
                    f"{s['bare_steps']:.0f} bare steps; every {s['every']} steps: "
                    f"{100 * s['amortized_fraction_of_bare']:+.1f}% of the bare step"
                )
        return 0
    reject_unused(args, PROBE_COST_FLAGS, "without --probe-costs")
    if not args.json:
        print("keel bench detect: scenario zoo under Guard(policy='observe'), probes='transformer', default detectors")
    with progress_bar(
        len(args.only or list_scenarios()), "keel bench detect", enabled=not args.json, unit="scenario"
    ) as bar:

        def show_row(score: ScenarioScore) -> None:
            if not args.json:
                bar.write(_row(score), file=sys.stdout)  # a result row, printed above the bar
            bar.update()

        with silenced():  # the score rows are this benchmark's output; the runs' findings are in the scores
            result = bench_detect(args.only, seed=args.seed or 0, reference=not args.no_reference, progress=show_row)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        s = result["summary"]
        print(
            f"instabilities detected {s['detected']}/{s['instabilities']}, "
            f"lead > 0 on {s['lead_positive']}; "
            f"false alarms on healthy runs: {s['false_alarms']} ({s['healthy']} runs); "
            f"passed {s['passed']}/{s['total']} in {s['wall_s']}s"
        )
    return 0 if result["summary"]["passed"] == result["summary"]["total"] else 1


# --- the cost of the probes ------------------------------------------------------------------------------
SHARPNESS_SETTINGS = {
    "zoo: iters=8, no trace, every 50": (8, 0, 50),
    "default: iters=20, trace_probes=10, every 100": (20, 10, 100),
}


def probe_costs(
    *,
    size: str = "small",
    steps: int = 10,
    repeats: int = 7,
    threads: int | None = None,
    groups: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """CPU time per step of each of keel's opt-in probes, stabilizers, quantizers, step-changing losses, remedies
    and `Guard` options on a proxy model, against the loop without it.

    Every variant trains its own copy of the proxy under `Guard(policy="observe")` with the foundation's
    probes (loss, gradient and parameter norms) plus the probe measured, forced to measure on every step (so
    a sampled probe shows its cost per measurement; ``amortized_fraction_of_bare`` spreads that over the
    probe's default cadence). ``transformer`` is ``probes="transformer"`` at the default cadences: what the
    proxy trainer, the demo and the zoo run. Variants run interleaved, one block each per repeat, in rotating
    order, and each repeat's figure is the process CPU time of the block (not wall time: this machine is
    shared). Sharpness, which runs its own forward and Hessian-vector products, is timed per measurement.
    The router probe runs twice: on the dense proxy (no router: nothing hooked) and on the proxy with MoE blocks
    (``MoeConfig()``), measured there against the MoE proxy's own ``moe bare`` and ``moe foundation`` loops.
    Quantization-aware training runs on the proxy with OFQ's 3-bit StatsQ grid on every linear but the head
    (`keel.nn.fake_quantize`): ``qat bare`` against the dense ``bare`` loop is fake quantization's own cost; the
    ``weight_oscillation`` probe and confidence-guided annealing (``cga``, its freeze and restore around each
    ``optimizer.step()``) are measured against that model's ``qat bare`` and ``qat foundation``.
    The rows of `keel.harness.bench._component_costs` (``ROWS``, ``against`` in the result names each row's two
    baselines): the stabilizers of `keel.nn.stabilize` in bare loops against the bare loop of the same proxy (dense,
    or with MoE blocks for the MoE ones); the minmax int4 grid against the dense ``bare``; teacher intervention on
    the 3-bit QAT proxy against ``qat bare``; StableMax cross-entropy against ``bare``; ALLoRA against peft LoRA
    without it (``lora bare``, skipped without peft); ``max_grad_norm`` and ``sync="deferred"`` against
    ``foundation``. ``groups`` (`GROUPS`) runs only those rows and their baselines; sharpness is timed with
    ``probes``.
    """
    import importlib.util
    import inspect
    import statistics

    import torch
    import torch.nn.functional as F

    from keel.guard import Guard
    from keel.harness.bench._component_costs import ROWS, component_loop
    from keel.harness.bench.loop import train_steps
    from keel.nn import fake_quantize
    from keel.optim import ConfidenceGuidedAnnealing
    from keel.proxy import MoeConfig, ProxyBatches, create_proxy_model
    from keel.signals import StepContext, create_probe
    from keel.signals.sharpness import SharpnessProbe

    if threads is not None:
        torch.set_num_threads(threads)
    rows = selected_rows(groups)
    skipped = []
    if importlib.util.find_spec("peft") is None:  # ALLoRA's rows need peft's LoRA layers (keel[test])
        skipped = [n for n in rows if ROWS[n].group == "lora"]
        rows = [n for n in rows if n not in skipped]
    base = ["loss", "grad_norm", "param_norm"]
    variants: dict[str, Any] = {"bare": None, "foundation": base}
    default_every: dict[str, int] = {}
    for probe in OPT_IN_PROBES:
        every = int(create_probe(probe).config.every)  # type: ignore[attr-defined]
        default_every[probe] = every
        variants[probe] = base + [create_probe(probe, every=1)]
    variants["transformer"] = "transformer"
    # the router probe on a proxy without routers (it should cost nothing) and on the proxy with MoE blocks, whose
    # own bare and foundation loops are its baselines
    default_every["router"] = int(create_probe("router").config.every)  # type: ignore[attr-defined]
    variants["router (no MoE)"] = base + [create_probe("router", every=1)]
    moe = ("moe bare", "moe foundation", "router")
    variants.update({"moe bare": None, "moe foundation": base, "router": base + [create_probe("router", every=1)]})
    # QAT: qat bare against the dense loop is the cost of fake quantization itself
    qat = ("qat bare", "qat foundation", "weight_oscillation", "cga")
    variants.update({"qat bare": None, "qat foundation": base, "cga": base})
    variants["weight_oscillation"] = base + [create_probe("weight_oscillation")]
    default_every.update({"weight_oscillation": 1, "cga": 1})  # both run on every step
    default_every["update_ratio"] = inspect.signature(Guard).parameters["log_every"].default  # its log steps
    default_every = {n: every for n, every in default_every.items() if n in rows}
    data = [ProxyBatches(batch_size=16, seq_len=64, seed=0).next() for _ in range(4)]
    loops: dict[str, tuple[Any, ...]] = {}
    for name in rows:
        loss_fn, scaler = None, None
        if name in variants:
            torch.manual_seed(0)
            model: torch.nn.Module = create_proxy_model(size, **({"moe": MoeConfig()} if name in moe else {}))
            if name in qat:
                model = fake_quantize(model, "statsq", bits=3)
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            if name == "cga":
                ConfidenceGuidedAnnealing.for_model(model).attach(opt)
            probes = variants[name]
            kwargs = None if probes is None else {"probes": probes}
        else:  # a stabilizer, quantizer, loss, ALLoRA or a Guard option (keel.harness.bench._component_costs)
            model, opt, kwargs, loss_fn, scaler = component_loop(name, size, base)
        guard = Guard(model, opt, policy="observe", **kwargs) if kwargs is not None else None
        loops[name] = (model, opt, data, guard, loss_fn, scaler)

    def block(name: str, n: int) -> float:
        model, opt, data, guard, loss_fn, scaler = loops[name]
        start = time.process_time()
        train_steps(model, opt, data, guard, n, loss_fn=loss_fn, scaler=scaler)
        return (time.process_time() - start) / n

    names = list(loops)
    for name in names:
        block(name, 3)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(block(name, steps))
        if progress is not None:
            progress(f"repeat {r + 1}/{repeats}")
    for loop in loops.values():
        if loop[3] is not None:
            loop[3].close()
    bare = {n: ROWS[n].bare for n in names}
    foundation = {n: ROWS[n].foundation for n in names}
    ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    ratio = {n: statistics.median(a / b for a, b in zip(times[n], times[bare[n]], strict=True)) for n in names}
    extra = {
        n: statistics.median(1e3 * (a - b) for a, b in zip(times[n], times[foundation[n]], strict=True)) for n in names
    }
    amortized = {n: extra[n] / every / ms[bare[n]] for n, every in default_every.items()}
    result = {
        "size": size,
        "steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "groups": list(groups or GROUPS),
        "cpu_ms_per_step": ms,
        "ratio_to_bare": ratio,
        "extra_ms_vs_foundation": extra,
        "against": {n: [bare[n], foundation[n]] for n in names},
        "default_every": default_every,
        "amortized_fraction_of_bare": amortized,
        "sharpness": {},
        "skipped": {n: "peft is not installed" for n in skipped},
    }
    if groups is not None and "probes" not in groups:
        return result
    model, opt, data, _, _, _ = loops["bare"]
    x, y = data[0]
    named = list(model.named_parameters())
    ctx = StepContext(
        step=0,
        loss=torch.zeros(()),
        model=model,
        optimizer=opt,
        names=tuple(n for n, _ in named),
        params=[p for _, p in named],
        grads=[p.grad for _, p in named if p.grad is not None],
        log_step=False,
    )
    sharpness = {}
    for setting, (iters, trace, every) in SHARPNESS_SETTINGS.items():
        sharp = SharpnessProbe(
            lambda: F.cross_entropy(model(x[:8]).flatten(0, 1), y[:8].flatten()), iters=iters, trace_probes=trace
        )
        seconds = []
        for _ in range(3):
            start = time.process_time()
            sharp.measure(ctx)
            seconds.append(time.process_time() - start)
            sharp._last_lr = None
        s = statistics.median(seconds)
        sharpness[setting] = {
            "s_per_measurement": s,
            "every": every,
            "bare_steps": 1e3 * s / ms["bare"],
            "amortized_fraction_of_bare": 1e3 * s / every / ms["bare"],
        }
    result["sharpness"] = sharpness
    result["sharpness_batch"] = "8x64 (a fixed probe batch)"
    return result


if __name__ == "__main__":  # `python -m keel.harness.bench.detect` until `keel bench detect` is registered
    _parser = argparse.ArgumentParser(prog="keel bench detect", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
