"""`keel bench rl`: the RL and preference scenarios, keel beside rlwatch on the same logged statistics.

For every scenario (`keel.harness.scenarios.rl`): did keel report the right kind (a warning or critical finding of
the expected kind), at which step, how many steps before the run's own metric degraded (``lead_steps`` = the
scenario's harm step − the detection step: the chosen log-prob displaced, the reward stalled, the gold reward
peaked), how many warning/critical findings a healthy run had (false alarms) and, for an instability, how many of
other kinds it had; and the remedy's effect (the metric without and with it). rlwatch 0.5.1, a PyPI peer that
watches GRPO/PPO runs, is fed the SAME per-step statistics (entropy, kl, reward, reward_std, loss, grad_norm, under
the names its TRL callback maps; kl only where the run logs one) through its manual ``log_step`` API, one call per
optimizer step (finer than its TRL callback, which sees one averaged value per logging interval); its alerts are
scored the same way.

Example:
    keel bench rl                       # every scenario, a table
    keel bench rl --json                # the figures as JSON
    keel bench rl --quick --only grpo_healthy
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from keel._core import keys
from keel._core.argtypes import cpu_threads, nonnegative_int
from keel.guard.console import progress_bar, silenced
from keel.harness.scenarios.rl import create_rl_scenario, list_rl_scenarios
from keel.harness.scenarios.rl._lm import GRAD_NORM, LOSS, RLRun, Trace

# rlwatch's log_step arguments ← keel's keys (its TRL callback maps TRL's entropy, kl, reward, reward_std, loss and
# grad_norm onto these; TRL_ALIASES maps the same TRL names onto keel's keys)
RLWATCH_ARGS = {
    "entropy": keys.RL_ENTROPY,
    "kl_divergence": keys.RL_KL,
    "reward_mean": keys.RL_REWARD_MEAN,
    "reward_std": keys.RL_REWARD_STD,
    "loss": LOSS,
    "grad_norm": GRAD_NORM,
}
# rlwatch's rules that name each keel kind's phenomenon (it has none for preference training)
RLWATCH_KINDS = {
    "policy_entropy_collapse": ("entropy_collapse",),
    "reward_overoptimization": ("reward_hacking", "reward_mean_drift"),
    "kl_blowup": ("kl_explosion",),
    "likelihood_displacement": (),
}


@dataclass(kw_only=True)
class MonitorScore:
    """One monitor on one run: what it detected and when."""

    detected: bool | None  # None: the monitor has no rule for this kind
    kind: str | None
    step: int | None
    lead_steps: int | None
    false_alarms: int
    other_alarms: int
    alarms: list[list[Any]] = field(default_factory=list)


@dataclass(kw_only=True)
class RLScore:
    """keel and rlwatch on one scenario (the ``--json`` record)."""

    name: str
    healthy: bool
    expected_kind: str | None
    summary: str
    harm_step: int | None
    harm: str
    keel: MonitorScore
    rlwatch: MonitorScore
    remedy: str
    effect: dict[str, Any]
    lead_required: bool
    passed: bool
    steps: int
    wall_s: float


def score(
    alarms: Sequence[tuple[int, str, str]], *, healthy: bool, expected: tuple[str, ...] | None, harm_step: int | None
) -> MonitorScore:
    """Score ``(step, kind, severity)`` alarms in step order; ``expected``: the kinds that name the instability."""
    if healthy:
        return MonitorScore(
            detected=None,
            kind=None,
            step=None,
            lead_steps=None,
            false_alarms=len(alarms),
            other_alarms=0,
            alarms=[list(a) for a in alarms][:20],
        )
    hits = [a for a in alarms if expected and a[1] in expected]
    first = hits[0] if hits else None
    lead = None if first is None or harm_step is None else harm_step - first[0]
    return MonitorScore(
        detected=None if not expected else bool(hits),
        kind=first[1] if first else None,
        step=first[0] if first else None,
        lead_steps=lead,
        false_alarms=0,
        other_alarms=len(alarms) - len(hits),
        alarms=[list(a) for a in alarms][:20],
    )


def rlwatch_alarms(trace: Trace) -> list[tuple[int, str, str]]:
    """rlwatch 0.5.1's alerts on ``trace`` (its default config, storage in a temporary folder, no delivery)."""
    from rlwatch import RLWatch, RLWatchConfig

    # its alert panels (rich, on stderr) are not this benchmark's output: the alerts are returned instead
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stderr(io.StringIO()):
        config = RLWatchConfig(framework="manual", run_id="keel-bench-rl")
        config.storage.log_dir = folder
        monitor = RLWatch(config)
        found = []
        try:
            for step, row in enumerate(trace.steps):
                given: dict[str, Any] = {arg: row[key] for arg, key in RLWATCH_ARGS.items() if key in row}
                found += [(a.step, a.detector, a.severity) for a in monitor.log_step(step, **given)]
        finally:
            monitor.store.close()
    return found


def score_scenario(name: str, *, seed: int = 0, quick: bool = False) -> RLScore:
    """Run one scenario (its remedy runs included) and score keel and rlwatch on its trace."""
    scenario = create_rl_scenario(name)
    spec = scenario.spec
    with silenced():  # the runs' console summaries are not this benchmark's output
        run: RLRun = scenario.run(seed=seed, quick=quick)
    expected = (spec.expected_kind,) if spec.expected_kind else None
    keel_alarms = [(f.step, f.kind, f.severity) for f in run.alarms()]
    keel_score = score(keel_alarms, healthy=spec.healthy, expected=expected, harm_step=run.harm_step)
    rlwatch_expected = RLWATCH_KINDS.get(spec.expected_kind or "", ()) if expected else None
    rlwatch_score = score(
        rlwatch_alarms(run.trace), healthy=spec.healthy, expected=rlwatch_expected, harm_step=run.harm_step
    )
    if spec.healthy:
        passed = keel_score.false_alarms == 0
    else:
        lead = keel_score.lead_steps
        passed = bool(keel_score.detected) and (not spec.lead_required or (lead is not None and lead > 0))
    return RLScore(
        name=name,
        healthy=spec.healthy,
        expected_kind=spec.expected_kind,
        summary=spec.summary,
        harm_step=run.harm_step,
        harm=run.harm,
        keel=keel_score,
        rlwatch=rlwatch_score,
        remedy=spec.fix,
        effect=run.effect,
        lead_required=spec.lead_required,
        passed=passed,
        steps=len(run.trace.steps),
        wall_s=round(run.wall_s, 1),
    )


def bench_rl(
    names: Sequence[str] | None = None,
    *,
    seed: int = 0,
    quick: bool = False,
    progress: Callable[[RLScore], None] | None = None,
) -> dict[str, Any]:
    """Score every RL scenario (or ``names``). Returns ``{"scenarios": [...], "summary": {...}, ...}``."""
    if importlib.util.find_spec("rlwatch") is None:  # checked before minutes of training, not after
        raise ValueError(
            "keel bench rl runs rlwatch beside keel; allowed: with rlwatch installed (pip install 'keel[rl-bench]')"
        )
    names = list(names) if names else list_rl_scenarios()
    unknown = [n for n in names if n not in list_rl_scenarios()]
    if unknown:
        raise ValueError(f"unknown RL scenario(s) {unknown}; allowed: {', '.join(list_rl_scenarios())}")
    scores = []
    for name in names:
        scores.append(score_scenario(name, seed=seed, quick=quick))
        if progress is not None:
            progress(scores[-1])
    unstable = [s for s in scores if not s.healthy]
    healthy = [s for s in scores if s.healthy]

    def tally(monitor: str) -> dict[str, int]:
        ms = [getattr(s, monitor) for s in unstable]
        return {
            "detected": sum(bool(m.detected) for m in ms),
            "has_rule": sum(m.detected is not None for m in ms),
            "lead_positive": sum(1 for m in ms if m.lead_steps is not None and m.lead_steps > 0),
            "false_alarms": sum(getattr(s, monitor).false_alarms for s in healthy),
        }

    summary = {
        "instabilities": len(unstable),
        "healthy": len(healthy),
        "keel": tally("keel"),
        "rlwatch": tally("rlwatch"),
        "passed": sum(s.passed for s in scores),
        "total": len(scores),
        "wall_s": round(sum(s.wall_s for s in scores), 1),
    }
    return {"scenarios": [asdict(s) for s in scores], "summary": summary, "seed": seed, "quick": quick}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        action="append",
        metavar="SCENARIO",
        choices=list_rl_scenarios(),
        help=f"run only this scenario (repeatable); one of: {', '.join(list_rl_scenarios())}",
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every run (default: 0)")
    parser.add_argument("--quick", action="store_true", help="smaller, shorter runs (for tests)")
    parser.add_argument(
        "--threads",
        type=cpu_threads,
        default=1,
        help="torch threads (default: 1 — the models are tiny: more threads only contend on a busy machine)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def _row(s: RLScore) -> str:
    def show(v: object) -> str:
        return "-" if v is None else str(v)

    what = "healthy" if s.healthy else s.expected_kind or ""
    k, r = s.keel, s.rlwatch
    if s.healthy:
        figures = f"false_alarms keel={k.false_alarms} rlwatch={r.false_alarms}"
    else:
        figures = (
            f"keel: step={show(k.step)} lead={show(k.lead_steps)} other={k.other_alarms}  "
            f"rlwatch: {'no rule' if r.detected is None else f'step={show(r.step)} lead={show(r.lead_steps)}'}"
            f" other={r.other_alarms}"
        )
    return f"  {s.name:26s} {what:26s} {'PASS' if s.passed else 'FAIL'}  {figures}  ({s.wall_s:.1f}s)"


def main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    names = args.only or list_rl_scenarios()
    if not args.json:
        print("keel bench rl: RL/preference scenarios under Guard(policy='observe'); rlwatch 0.5.1 on the same stats")
    with progress_bar(len(names), "keel bench rl", enabled=not args.json, unit="scenario") as bar:

        def show_row(s: RLScore) -> None:
            if not args.json:
                bar.write(_row(s), file=sys.stdout)
            bar.update()

        result = bench_rl(names, seed=args.seed, quick=args.quick, progress=show_row)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        s = result["summary"]
        print(
            f"keel detected {s['keel']['detected']}/{s['instabilities']} (lead > 0 on {s['keel']['lead_positive']}), "
            f"false alarms {s['keel']['false_alarms']} on {s['healthy']} healthy runs; rlwatch detected "
            f"{s['rlwatch']['detected']}/{s['rlwatch']['has_rule']} it has a rule for, false alarms "
            f"{s['rlwatch']['false_alarms']}; passed {s['passed']}/{s['total']} in {s['wall_s']}s"
        )
    return 0 if result["summary"]["passed"] == result["summary"]["total"] else 1
