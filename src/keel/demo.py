"""`keel demo`: an unstable proxy recipe trained bare and under `Guard`, side by side.

The recipe (small proxy, AdamW at lr 0.1) is unstable on purpose: attention logits run away and the loss
stalls far above a healthy run's. The arms:

- ``reference``: the same model at a safe LR (3e-3), to show what a healthy loss is;
- ``bare``: the unstable recipe under ``policy="observe"`` — bit-identical to the loop without keel, so its
  store shows what happened without changing anything;
- ``guarded``: ``policy="skip"``, which may skip harmful updates;
- ``recovering``: ``policy="recover"``, which may also roll back to a snapshot and take actions (LR back-off ...);
- ``stabilized``: the same recipe after ``keel.stabilize(model, ["qk_norm", "z_loss"], optimizer=opt)``
  (QK-norm and z-loss, Wortsman et al. 2023), under ``policy="observe"``: prevention alone, nothing for keel
  to skip or undo — it trains without findings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from keel._core.argtypes import output_dir
from keel.detect import diagnose, format_diagnoses
from keel.guard.console import progress_bar
from keel.proxy.trainer import ProxyRun, TrainConfig, train_proxy
from keel.report import write_report

UNSTABLE = TrainConfig(size="small", lr=0.1, steps=600, warmup=20)
SAFE_LR = 3e-3
STABILIZERS = ("qk_norm", "z_loss")
QUICK_STEPS = 200


@dataclass(kw_only=True)
class DemoRun:
    """One arm of the demo: a name, the Guard policy, and the recipe it trains."""

    name: str
    policy: str
    config: TrainConfig
    note: str


def demo_runs(quick: bool = False) -> list[DemoRun]:
    config = replace(UNSTABLE, steps=QUICK_STEPS) if quick else UNSTABLE
    return [
        DemoRun(
            name="reference",
            policy="observe",
            config=replace(config, lr=SAFE_LR),
            note=f"the same model at a safe lr {SAFE_LR}",
        ),
        DemoRun(name="bare", policy="observe", config=config, note="keel watches, never touches"),
        DemoRun(name="guarded", policy="skip", config=config, note="keel may skip harmful updates"),
        DemoRun(name="recovering", policy="recover", config=config, note="keel may also roll back and take actions"),
        DemoRun(
            name="stabilized",
            policy="observe",
            config=replace(config, stabilize=STABILIZERS),
            note=f"the same recipe after keel.stabilize(model, {list(STABILIZERS)})",
        ),
    ]


def run_demo(out: str | Path = "runs/demo", quick: bool = False, stream=sys.stdout) -> dict[str, ProxyRun]:
    """Train every demo arm, print progress and a side-by-side summary; return the runs by name.

    Progress is a tqdm bar on stderr (on a terminal); what keel says while each arm trains (its ``keel`` log
    lines and its summary, `keel.guard.console`) is printed above the bar."""
    out = Path(out)
    results: dict[str, ProxyRun] = {}
    arms = demo_runs(quick)
    unstable = next(a.config for a in arms if a.name == "bare")
    print(
        f"keel demo: proxy '{unstable.size}', AdamW lr {unstable.lr}, {unstable.steps} steps "
        "— a recipe that is unstable on purpose",
        file=stream,
    )
    for arm in arms:
        with progress_bar(arm.config.steps, f"  {arm.name}", unit="step") as bar:
            results[arm.name] = train_proxy(
                arm.config, policy=arm.policy, run_dir=str(out / arm.name), progress=_show_loss(bar), overwrite=True
            )  # each demo is a new run
        run = results[arm.name]
        print(
            f"  {arm.name:<10} done in {run.wall_s:.1f}s, val loss {run.val_loss:.3f}"
            + (f" — aborted: {run.aborted}" if run.aborted else ""),
            file=stream,
            flush=True,
        )
    print_summary(results, arms, stream)
    print_diagnosis(results["bare"], results["stabilized"], stream)
    print(f"\nrun stores: {', '.join(str(out / a.name / 'run.sqlite') for a in arms)}", file=stream)
    try:
        report = write_report([out / a.name for a in arms], out / "report.html")
        print(f"report: {report}  (open it in a browser; it works offline)", file=stream)
    except Exception as exc:  # the runs and their stores stand on their own
        print(f"report: could not be written ({type(exc).__name__}: {exc})", file=stream)
    return results


def print_summary(results: dict[str, ProxyRun], arms: list[DemoRun], stream=sys.stdout) -> None:
    print("\n                      " + "".join(f"{a.name:>15}" for a in arms), file=stream)
    rows = [
        ("policy", lambda r: r.policy),
        ("stabilize", lambda r: "+".join(r.config.stabilize) or "-"),
        ("val loss (end)", lambda r: f"{r.val_loss:.3f}"),
        ("train loss (last 20)", lambda r: f"{_tail_mean(r.losses):.3f}"),
        ("worst train loss", lambda r: f"{max(r.losses, default=math.nan):.3f}"),
        ("skipped steps", lambda r: sum(d.action == "skip" for d in r.decisions)),
        ("rollbacks", lambda r: sum(d.action == "rollback" for d in r.decisions)),
        (
            "findings w/c/i",
            lambda r: "{warning}/{critical}/{info}".format_map(
                Counter({"warning": 0, "critical": 0, "info": 0}) + Counter(f.severity for f in r.findings)
            ),
        ),
        ("wall time", lambda r: f"{r.wall_s:.1f}s"),
    ]
    for label, cell in rows:
        print(f"{label:<22}" + "".join(f"{cell(results[a.name])!s:>15}" for a in arms), file=stream)
    for arm in arms:
        run = results[arm.name]
        serious = [f for f in run.findings if f.severity != "info"]
        acted = [d for d in run.decisions if d.action in ("rollback", "abort")]
        if not serious and not acted:
            continue
        print(f"\n{arm.name} ({arm.note}):", file=stream)
        # causes and advice are the diagnosis's, printed once below; a decision follows the findings of its step
        events = [(f.step, 0, f"{f.severity:<8} {f.kind} ({f.signal} = {f.value:.4g})") for f in serious[:6]]
        events += [(d.step, 1, f"{d.action.upper()}: {d.reason}") for d in acted[:4]]
        for step, _, text in sorted(events, key=lambda e: e[:2]):
            print(f"  step {step:>5}  {text}", file=stream)
        if len(serious) > 6:
            print(f"  … and {len(serious) - 6} more findings (see the run store)", file=stream)


def print_diagnosis(bare: ProxyRun, stabilized: ProxyRun, stream=sys.stdout) -> None:
    """The bare run's named causes, with when the loss degraded judged against the stabilized run.

    On its own the bare run cannot say when its loss degraded (it levels off high rather than rising); the
    stabilized run saw the same batches, so where the bare loss is worse than it is the degradation, and the
    steps between the first sighting and that point are how early keel saw it coming.
    """
    diagnoses = diagnose(bare.findings, losses=bare.losses, reference_losses=stabilized.losses)
    print("\ndiagnosis of the bare run (its loss judged against the stabilized run, same batches):", file=stream)
    print(format_diagnoses(diagnoses), file=stream)


def _tail_mean(values: list[float], n: int = 20) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else math.nan


def _show_loss(bar: Any) -> Callable[[int, float], None]:
    def show(step: int, loss: float) -> None:
        bar.update()
        if step % 10 == 0:
            bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)

    return show


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_STEPS} steps per run (about 2 minutes for the five runs)"
    )
    parser.add_argument(
        "--out", default="runs/demo", type=output_dir, help="where the run stores go (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON after the run")


def main(args: argparse.Namespace) -> int:
    results = run_demo(args.out, quick=args.quick, stream=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(
            json.dumps(
                {
                    name: {
                        "policy": r.policy,
                        "stabilize": list(r.config.stabilize),
                        "val_loss": r.val_loss,
                        "wall_s": r.wall_s,
                        "findings": [f.to_dict() for f in r.findings],
                        "skips": sum(d.action == "skip" for d in r.decisions),
                        "aborted": r.aborted,
                    }
                    for name, r in results.items()
                },
                indent=2,
                default=str,
            )
        )
    return 0
