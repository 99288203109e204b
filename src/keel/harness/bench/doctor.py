"""`keel bench doctor`: `keel doctor` on the real training logs in shared/data/realruns, against labels.json.

For every series: the run as logged (``keel doctor --json`` on the file), with warning/critical counts. For
the healthy runs every warning or critical is a false alarm. For a labelled spike or divergence it is
*detected* when a warning or critical falls between two logging strides before the first labelled step and
the end of the series; one earlier is a false alarm. Most labelled windows are 3–30 points long — shorter
than the 20 values the spike detector needs for a baseline — so each is also scored **with a healthy
prefix**: 64 real steps of the healthy llm.c GPT-2 run (steps 10000–10063: loss
and grad norm, each divided by its median there and multiplied by the labelled series' own pre-event
median), spaced at the series' logging stride, put before its first row. The prefix is real healthy noise
(larger than a 100B-parameter run's, so it makes detection harder, not easier); alarms inside it count as
false alarms. No threshold is set per file: every series runs through `keel.detect.default_detectors()`.

**Big logs** (``--sizes``): `keel doctor` on generated CSVs of the given numbers of rows — step, loss,
grad_norm, lr and a text column, with what long runs have (a resume that logs 1,000 steps again at 70 %, a
NaN loss every 100k rows, an empty grad-norm cell every 10th row) — each measured in a child process of its
own: wall time (reading, then the rest), the same without detectors (what the doctor itself costs), and peak
RSS. The record-based reader it replaced (`keel.harness.bench._doctor_legacy`) runs on the same files for the ratio.

The logs are not part of keel: ``--data DIR`` (or ``KEEL_REALRUNS=DIR``) names a folder with ``labels.json``
and the logs it lists; from keel's checkout the default is its workspace folder ``../shared/data/realruns``.

Example:
    keel bench doctor --data ../shared/data/realruns
    KEEL_REALRUNS=/data/realruns keel bench doctor --json
    keel bench doctor --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import keel
from keel._core.argtypes import int_range, positive_int
from keel.doctor import RawLog, examine, read_log
from keel.doctor.table import LogTable
from keel.doctor.timeline import build_timeline
from keel.harness.bench import _doctor_legacy as legacy
from keel.harness.bench.cli import reject_unused

# The labelled logs are third-party runs that keel does not ship: `--data` names their folder, else this
# environment variable, else keel's workspace folder beside the checkout (run from the checkout, as
# BENCHMARKS.md does). An installed keel without either says so in one line.
DATA_ENV = "KEEL_REALRUNS"
WORKSPACE_DATA = Path("..") / "shared" / "data" / "realruns"
PREFIX_SOURCE = "llmc_gpt2_124m_fineweb10b.csv"
PREFIX_STEPS = (10000, 10064)  # [start, end): a flat, healthy stretch of the llm.c run (no finding there)
HEALTHY_LABELS = ("healthy", "healthy_loss_throughput_anomaly", "healthy_with_labelled_events")

MAX_ROWS = 100_000_000  # --sizes: a generated log of more rows would not fit a machine's memory anyway


@dataclass(kw_only=True)
class SeriesScore:
    """One series' result (the ``--json`` record)."""

    file: str
    label: str
    points: int
    stride: int
    warnings: int
    criticals: int
    infos: int
    event_step: int | None = None
    context: int | None = None  # logged points before the first labelled step
    detected: bool | None = None
    detected_by: str | None = None  # "step kind severity" of the first alarm in the event window
    delay: int | None = None  # steps from the first labelled step to that alarm
    early_alarms: int = 0
    prefixed: dict[str, Any] = field(default_factory=dict)  # the same with a healthy prefix
    alarms: list[str] = field(default_factory=list)


def event_steps(label: dict[str, Any]) -> list[int]:
    """All labelled event steps of a series (spike steps, divergence start/step, peak)."""
    steps = list(label.get("spike_steps", []))
    steps += [label[k] for k in ("divergence_start", "divergence_step", "peak_step") if k in label]
    return sorted(set(steps))


def score_series(path: Path, label: dict[str, Any], prefix: list[tuple[float, float]] | None) -> SeriesScore:
    """Run `keel doctor` on one labelled series (and on it with a healthy prefix)."""
    log = read_log(path)
    result = examine(log)
    timeline = build_timeline(log)
    stride = result.summary["stride"]
    alarms = result.at_least("warning")
    score = SeriesScore(
        file=path.name,
        label=label.get("label", "?"),
        points=len(timeline),
        stride=stride,
        warnings=result.count("warning"),
        criticals=result.count("critical"),
        infos=result.count("info"),
        alarms=[f"{f.step} {f.kind} {f.severity}" for f in alarms],
    )
    events = event_steps(label)
    if not events or score.label in HEALTHY_LABELS:
        return score
    first = events[0]
    score.event_step = first
    score.context = int((timeline.steps < first).sum())
    _score_window(score.__dict__, alarms, first - 2 * stride, prefix_end=None)
    if prefix is not None:
        prefixed_log = with_prefix(log, prefix, first, stride)
        prefixed = examine(prefixed_log).at_least("warning")
        out: dict[str, Any] = {}
        _score_window(out, prefixed, first - 2 * stride, prefix_end=int(log.records.steps[0]))
        score.prefixed = out
    return score


def _score_window(out: dict[str, Any], alarms: list, window_start: int, prefix_end: int | None) -> None:
    hits = [f for f in alarms if f.step >= window_start]
    out["detected"] = bool(hits)
    out["detected_by"] = f"{hits[0].step} {hits[0].kind} {hits[0].severity}" if hits else None
    out["early_alarms"] = sum(f.step < window_start for f in alarms)
    if prefix_end is not None:
        out["prefix_alarms"] = sum(f.step < prefix_end for f in alarms)


def load_prefix(data: Path) -> list[tuple[float, float]] | None:
    """(loss, grad norm) of the healthy stretch, each divided by its median; None without the source file."""
    path = data / PREFIX_SOURCE
    if not path.is_file():
        return None
    first, end = PREFIX_STEPS
    rows = [(step, values) for step, values in read_log(path).records if first <= step < end]
    loss = [v["loss"] for _, v in rows]
    grad = [v["grad_norm"] for _, v in rows]
    ml, mg = statistics.median(loss), statistics.median(grad)
    return [(a / ml, b / mg) for a, b in zip(loss, grad, strict=True)]


def with_prefix(log: RawLog, prefix: list[tuple[float, float]], first_event: int, stride: int) -> RawLog:
    """``log`` with the healthy prefix before its first row, scaled to the series' own pre-event level."""
    before = [v for s, v in log.records if s < first_event] or [log.records[0][1]]
    levels = {}
    for column, index in (("loss", 0), ("grad_norm", 1)):
        seen = [v[column] for v in before if column in v and math.isfinite(v[column])]
        if seen:
            levels[column] = (statistics.median(seen), index)
    start = log.records[0][0] - stride * len(prefix)
    records = [
        (start + i * stride, {c: level * point[idx] for c, (level, idx) in levels.items()})
        for i, point in enumerate(prefix)
    ]
    return RawLog(
        source=log.source,
        format=log.format,
        records=LogTable.from_records(records + list(log.records)),
        step_column=log.step_column,
    )


def run(data: Path) -> list[SeriesScore]:
    labels = json.loads((data / "labels.json").read_text())["series"]
    prefix = load_prefix(data)
    return [score_series(data / entry["file"], entry, prefix) for entry in labels if (data / entry["file"]).is_file()]


def format_markdown(scores: list[SeriesScore]) -> str:
    healthy = [s for s in scores if s.label in HEALTHY_LABELS]
    events = [s for s in scores if s.label not in HEALTHY_LABELS]
    lines = [
        "Healthy runs (every warning or critical is a false alarm):",
        "",
        "| file | label | points | stride | warnings | criticals | info (one-batch outliers) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| `{s.file}` | {s.label} | {s.points} | {s.stride} | {s.warnings} | {s.criticals} | {s.infos} |"
        for s in healthy
    ]
    lines += [
        "",
        "Labelled spikes and divergences (context = logged points before the first labelled step; "
        "the spike detector needs 20):",
        "",
        "| file | label | points | context | as logged: first alarm in window | early alarms | "
        "with healthy prefix: first alarm | delay (steps) | prefix/early alarms |",
        "|---|---|---:|---:|---|---:|---|---:|---:|",
    ]
    for s in events:
        p = s.prefixed
        delay = (
            int(p["detected_by"].split()[0]) - s.event_step
            if p.get("detected_by") and s.event_step is not None
            else None
        )
        lines.append(
            f"| `{s.file}` | {s.label} | {s.points} | {s.context} | {s.detected_by or 'none'} | "
            f"{s.early_alarms} | {p.get('detected_by') or 'none'} | "
            f"{'' if delay is None else delay} | "
            f"{p.get('prefix_alarms', '')}/{p.get('early_alarms', '')} |"
        )
    return "\n".join(lines)


def write_sweep_log(path: Path, rows: int, seed: int = 0) -> None:
    """A CSV training log of ``rows`` rows (see the module docstring for what it holds)."""
    rng = np.random.default_rng(seed)
    i = np.arange(rows)
    steps = i.copy()
    resume = int(rows * 0.7)
    steps[resume:] -= min(1000, resume)  # resumed from a checkpoint 1,000 steps back
    loss = (2.0 + 3.0 * np.exp(-i / max(1, rows / 10))) * (1 + 0.02 * rng.standard_normal(rows))
    loss[i % 100_000 == 99_999] = np.nan
    grad = np.exp(0.1 * rng.standard_normal(rows))
    lr = 1e-3 * np.minimum(1.0, (i + 1) / 1000)
    with path.open("w") as fh:
        fh.write("step,loss,grad_norm,lr,phase\n")
        for lo in range(0, rows, 65536):
            hi = min(lo + 65536, rows)
            fh.write(
                "".join(
                    _row(*cells)
                    for cells in zip(
                        steps[lo:hi].tolist(),
                        loss[lo:hi].tolist(),
                        grad[lo:hi].tolist(),
                        lr[lo:hi].tolist(),
                        strict=True,
                    )
                )
            )


def _row(step: int, loss: float, grad: float, lr: float) -> str:
    grad_cell = "" if step % 10 == 9 else f"{grad:.6g}"
    return f"{step},{loss:.6g},{grad_cell},{lr:.6g},{'warmup' if step < 1000 else 'main'}\n"


def measure(path: str, reader: str) -> dict[str, Any]:
    """`keel doctor` on ``path`` in this process, with today's reader (``"columnar"``) or the old one
    (``"records"``): seconds to read, to examine, to examine without detectors, and the peak RSS."""
    start_rss = peak_rss_mb()
    # the two readers' logs are different types, each only ever given to its own examine
    read: Callable[[str], Any] = read_log if reader == "columnar" else legacy.read_csv_log
    examine_: Callable[..., Any] = examine if reader == "columnar" else legacy.examine
    t0 = time.perf_counter()
    log = read(path)
    t1 = time.perf_counter()
    result = examine_(log)
    t2 = time.perf_counter()
    peak = peak_rss_mb()
    examine_(log, detectors=lambda: [])
    t3 = time.perf_counter()
    return {
        "read_s": t1 - t0,
        "examine_s": t2 - t1,
        "total_s": t2 - t0,
        "without_detectors_s": t1 - t0 + t3 - t2,
        "peak_rss_mb": peak,
        "rss_after_imports_mb": start_rss,
        "findings": len(result.findings),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: Linux's VmHWM, which starts afresh at exec; ``ru_maxrss``
    elsewhere (on Linux it keeps the forking parent's peak, so a small child would report the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _child(path: Path, reader: str, timeout: float) -> dict[str, Any]:
    src = str(Path(keel.__file__).resolve().parents[1])  # the folder that holds this keel, for the child
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = (
        "import json; from keel.harness.bench.doctor import measure; "
        f"print(json.dumps(measure({str(path)!r}, {reader!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"the {reader} child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep(sizes: list[int], *, baseline: bool = True, repeats: int = 1, timeout: float = 3600) -> list[dict[str, Any]]:
    """One row per size: the columnar reader's figures (median of ``repeats`` children) and the old one's."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="keel-bench-doctor-") as tmp:
        for size in sizes:
            path = Path(tmp) / f"log_{size}.csv"
            write_sweep_log(path, size)
            row: dict[str, Any] = {"rows": size, "mb": path.stat().st_size / 1e6}
            for reader in ("columnar", "records") if baseline else ("columnar",):
                runs = [_child(path, reader, timeout) for _ in range(repeats)]
                row[reader] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            path.unlink()
            rows.append(row)
    return rows


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """The sweep as a Markdown table: today's figures, the old reader's, and the ratios (old / today)."""
    lines = [
        "| rows | file MB | total s | read s | without detectors s | peak RSS MB | findings | old total s "
        "| old without detectors s | old peak RSS MB | old findings | speed-up (total / without detectors) "
        "| memory ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        new, old = r["columnar"], r.get("records")
        tail = "– | – | – | – | – | –"
        if old:
            tail = (
                f"{old['total_s']:.1f} | {old['without_detectors_s']:.1f} | {old['peak_rss_mb']:.0f} | "
                f"{old['findings']:.0f} | {old['total_s'] / new['total_s']:.1f}× / "
                f"{old['without_detectors_s'] / new['without_detectors_s']:.1f}× | "
                f"{old['peak_rss_mb'] / new['peak_rss_mb']:.1f}×"
            )
        lines.append(
            f"| {r['rows']:,} | {r['mb']:.1f} | {new['total_s']:.2f} | {new['read_s']:.2f} | "
            f"{new['without_detectors_s']:.2f} | {new['peak_rss_mb']:.0f} | {new['findings']:.0f} | {tail} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"the folder with labels.json and the logs it lists (default: ${DATA_ENV}, else "
        f"{WORKSPACE_DATA} when it exists)",
    )
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    parser.add_argument(
        "--sizes",
        type=int_range(1, MAX_ROWS),
        nargs="+",
        default=None,
        metavar="ROWS",
        help=f"instead: time keel doctor on generated CSVs of these many rows, up to {MAX_ROWS:,} (a size sweep)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="with --sizes: skip the old record-based reader (slow on big logs)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="with --sizes: children per size, the median (default: 1)"
    )


def default_data() -> Path | None:
    """The logs' folder when ``--data`` is not given: ``$KEEL_REALRUNS``, else the workspace folder if it exists."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return WORKSPACE_DATA if WORKSPACE_DATA.is_dir() else None


def main(args: argparse.Namespace) -> int:
    if getattr(args, "sizes", None):
        reject_unused(args, ("data",), "with --sizes (the sweep times generated CSVs)")
        rows = sweep(args.sizes, baseline=not args.no_baseline, repeats=args.repeats or 1)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"keel bench doctor --sizes: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}\n")
            print(format_sweep(rows))
        return 0
    reject_unused(args, ("no_baseline", "repeats"), "without --sizes")
    data = args.data or default_data()
    if data is None:
        print(
            f"keel bench doctor: error: no labelled logs: pass --data DIR or set {DATA_ENV}=DIR, a folder with "
            f"labels.json and the logs it lists (keel ships none; the default {WORKSPACE_DATA} is not here)",
            file=sys.stderr,
        )
        return 2
    if not (data / "labels.json").is_file():
        raise ValueError(f"no labels.json in {data}")  # keel.cli prints it on one line, control characters escaped
    scores = run(data)
    if args.json:
        print(json.dumps([asdict(s) for s in scores], indent=2))
    else:
        print(f"keel bench doctor: {len(scores)} series from {data}\n")
        print(format_markdown(scores))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m keel.harness.bench.doctor", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
