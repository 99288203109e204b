"""Poisoned examples in otherwise clean batches: does keel name them, skip-list them, and keep them out after?

Four runs of the tiny proxy LM over one indexed set of corpus windows (`_corpus.IndexedWindows`), each epoch in
the same seeded order:

1. **poisoned** — epoch 1 over every window, a few of them poisoned (``per_batch`` in each of the batches at
   ``poisoned_steps``), under ``Guard(policy="skip", attribution=Attribution(per-example loss), recovery=
   RecoveryConfig(replay=True, disk snapshot at the epoch's end))``; at ``fault_step`` (a clean batch) the
   gradient is multiplied by 1000 after ``backward()``, a fault of that computation only. Then the run stops.
2. **resumed** — a new process's view: ``Guard(resume=True)`` on the same run directory (model and optimizer from
   the disk snapshot), epochs 2.. through ``SkipListSampler(order, run_dir)``.
3. **fresh** — a second run from scratch, every epoch through the same `SkipListSampler`, bare loop.
4. **clean** — every epoch over the windows less the poisoned ones (a run that never had them), bare loop.
   And, for scale, **unguarded**: every epoch over the poisoned set, bare loop (what the poison costs untreated).

Measured: the examples keel names among each attributed finding's top offenders and as outliers (precision /
recall over the poisoned set; steps replay found transient are left out, as keel leaves them out of the skip
list), what it writes to the skip list, how replay classifies the faulty step and the
poisoned ones, how many poisoned ids the resumed and fresh runs draw, and each run's final loss on held-out text.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import keel
from keel._core import keys
from keel._core.validate import check_types, require_ints
from keel.data import SkipList, SkipListSampler
from keel.detect import Detector, default_detectors
from keel.detect.spike import GRAD_NORM_DEFAULTS, SpikeConfig, SpikeDetector
from keel.guard.console import silenced
from keel.harness.scenarios.data._corpus import IndexedWindows, batched
from keel.proxy import ProxyBatches, create_proxy_model
from keel.recover import RecoveryConfig

FAULT_SCALE = 1e3  # the corrupted step's gradient, times its true value: a flipped exponent bit, roughly


@dataclass(kw_only=True)
class PoisonConfig:
    """The poisoned-examples scenario.

    Attributes:
        examples: Corpus windows in the data set.
        batch_size: Windows per step.
        seq_len: Bytes per window.
        epochs: Epochs of every run (the poisoned run trains the first, the resumed run the rest).
        poisoned_steps: Steps of the first epoch whose batches get poisoned examples (after the detectors'
            20-step warm-up).
        per_batch: Poisoned examples in each of those batches.
        fault_step: The step whose gradient is corrupted after ``backward()`` (a clean batch); None: none.
        top_k: Offenders recorded per attributed finding.
        grad_norms: Also rank by per-example gradient norm (``Attribution(grad_norms=True)``).
        grad_critical: ``(critical_z, critical_excess)`` of the gradient-norm spike detector; None: keel's
            defaults (z 12 and 20x the median). A poisoned batch here reaches 5-30x (see `_corpus`).
        size: Proxy model size.
        lr: AdamW learning rate.
        eval_batches: Held-out batches of 32 windows the final loss is measured on.
        seed: Seed of the data set, the orders and the model.
    """

    examples: int = 4096
    batch_size: int = 16
    seq_len: int = 64
    epochs: int = 2
    poisoned_steps: tuple[int, ...] = (100, 180)
    per_batch: int = 4
    fault_step: int | None = 140
    top_k: int = 8
    grad_norms: bool = True
    grad_critical: tuple[float, float] | None = None
    size: str = "tiny"
    lr: float = 3e-3
    eval_batches: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "examples", "batch_size", "seq_len", "epochs", "per_batch", "top_k", "eval_batches")
        if self.epochs < 2:
            raise ValueError(f"PoisonConfig.epochs={self.epochs}; allowed: >= 2 (the resumed run trains epochs 2..)")
        steps = self.steps_per_epoch
        late = [s for s in (*self.poisoned_steps, self.fault_step) if s is not None and not 20 <= s < steps - 6]
        if late:
            raise ValueError(
                f"PoisonConfig.poisoned_steps={self.poisoned_steps!r}, fault_step={self.fault_step!r}: steps {late} "
                f"with {steps} steps per epoch (examples={self.examples}, batch_size={self.batch_size}); allowed: "
                f"20 <= step < {steps - 6} (after the detectors' warm-up, and clear of the epoch-end snapshot keel "
                "defers after trouble)"
            )
        if self.per_batch > self.batch_size // 2:
            raise ValueError(
                f"PoisonConfig.per_batch={self.per_batch}; allowed: 1..{self.batch_size // 2} (the batch median must "
                "stay clean for an outlier to stand out)"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.examples // self.batch_size

    @classmethod
    def quick(cls, **overrides: Any) -> PoisonConfig:
        """A smaller run (tests, ``--quick``): 3072 windows, 192 steps per epoch."""
        return cls(**{"examples": 3072, "poisoned_steps": (110, 150), "fault_step": 130, **overrides})


@dataclass(kw_only=True)
class PoisonResult:
    """What the scenario measured (`PoisonConfig` for the setting)."""

    poisoned_ids: list[int]
    poisoned_steps: list[int]
    attributed: list[dict[str, Any]]  # per attributed step: kind, severity, ranked offenders, replay verdict
    decisions: list[dict[str, Any]]
    scores: dict[str, dict[str, float | int]]  # precision / recall over the poisoned set, per way of naming
    skip_list: list[dict[str, Any]]
    fault: dict[str, Any]  # the corrupted step: what replay called it, what the decision was
    poisoned_verdicts: list[str]  # replay's verdict on each poisoned step ("data", "transient", "not replayed")
    drawn: dict[str, int]  # poisoned ids each honouring run drew (resumed, fresh)
    final_loss: dict[str, float]  # held-out loss after training, per run
    relative_to_clean: dict[str, float]  # (run - clean) / clean
    resumed_from_step: int
    wall_s: dict[str, float] = field(default_factory=dict)


def example_losses(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Each window's mean next-byte cross-entropy (the loop's loss is their mean)."""
    x, y = batch
    return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)


def run_poisoned_examples(config: PoisonConfig | None = None, run_dir: str | Path | None = None) -> PoisonResult:
    """Run the scenario (`PoisonConfig` for what it does); ``run_dir``: where the guarded runs write (a temporary
    folder by default)."""
    cfg = config or PoisonConfig()
    data = IndexedWindows(examples=cfg.examples, seq_len=cfg.seq_len, seed=cfg.seed)
    first = list(batched(data.order(0), cfg.batch_size))
    spread = cfg.batch_size // cfg.per_batch  # poisoned positions spread over the batch, not bunched at its head
    poisoned = sorted(first[s][j * spread] for s in cfg.poisoned_steps for j in range(cfg.per_batch))
    data.poison(poisoned)
    evaluate = _evaluator(cfg)
    wall: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="keel-bench-data-") as tmp, silenced():
        folder = Path(run_dir) if run_dir is not None else Path(tmp) / "run"
        start = time.perf_counter()
        guard = _poisoned_epoch(cfg, data, folder)
        wall["poisoned"] = time.perf_counter() - start
        start = time.perf_counter()
        resumed_model, resumed_from, resumed_drawn = _resumed(cfg, data, folder, set(poisoned))
        wall["resumed"] = time.perf_counter() - start
        skip_entries = [e.to_json() for e in SkipList(folder).entries]
        honoured = {e: SkipListSampler(data.order(e), folder) for e in range(cfg.epochs)}
        start = time.perf_counter()
        fresh_model, fresh_drawn = _bare(cfg, data, lambda e: honoured[e], set(poisoned))
        wall["fresh"] = time.perf_counter() - start
    start = time.perf_counter()
    clean_model, _ = _bare(cfg, data, lambda e: [i for i in data.order(e) if i not in set(poisoned)], set())
    wall["clean"] = time.perf_counter() - start
    unguarded_model, _ = _bare(cfg, data, data.order, set())
    losses = {
        "clean": evaluate(clean_model),
        "resumed": evaluate(resumed_model),
        "fresh": evaluate(fresh_model),
        "unguarded": evaluate(unguarded_model),
    }
    attributed = _attributed(guard)
    fault = _fault(guard, cfg.fault_step)
    verdicts = {a["step"]: a["replay"] for a in attributed}
    return PoisonResult(
        poisoned_ids=poisoned,
        poisoned_steps=list(cfg.poisoned_steps),
        attributed=attributed,
        decisions=[
            {"step": d.step, "action": d.action, "reason": d.reason[:160]} for d in guard.decisions if d.action != "ok"
        ],
        scores=_scores(attributed, skip_entries, set(poisoned)),
        skip_list=skip_entries,
        fault=fault,
        poisoned_verdicts=[verdicts.get(s, "not attributed") for s in cfg.poisoned_steps],
        drawn={"resumed": resumed_drawn, "fresh": fresh_drawn},
        final_loss={k: round(v, 5) for k, v in losses.items()},
        relative_to_clean={k: round((v - losses["clean"]) / losses["clean"], 5) for k, v in losses.items()},
        resumed_from_step=resumed_from,
        wall_s={k: round(v, 2) for k, v in wall.items()},
    )


def _model(cfg: PoisonConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(cfg.seed)
    model = create_proxy_model(cfg.size, seq_len=cfg.seq_len)
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr)


def _guard(cfg: PoisonConfig, model: nn.Module, opt: torch.optim.Optimizer, folder: Path, **kw: Any) -> keel.Guard:
    # one disk snapshot, at the end of the first epoch: the point the resumed run continues from
    recovery = RecoveryConfig(replay=True, snapshot_every=cfg.steps_per_epoch, disk_every=1)
    attribution = keel.Attribution(loss_fn=example_losses, top_k=cfg.top_k, grad_norms=cfg.grad_norms)
    return keel.Guard(
        model,
        opt,
        run_dir=str(folder),
        policy="skip",
        attribution=attribution,
        recovery=recovery,
        detectors=_detectors(cfg),
        **kw,
    )


def _detectors(cfg: PoisonConfig) -> list[Detector] | None:
    """keel's default detectors; the gradient-norm spike detector's critical threshold as ``cfg`` sets it."""
    if cfg.grad_critical is None:
        return None
    z, excess = cfg.grad_critical
    config = SpikeConfig(
        signal=keys.GRAD_NORM,
        log_scale=GRAD_NORM_DEFAULTS["log_scale"],
        min_excess=GRAD_NORM_DEFAULTS["min_excess"],
        scale_floor=GRAD_NORM_DEFAULTS["scale_floor"],
        critical_excess=excess,
        critical_z=z,
    )
    return [
        SpikeDetector(config) if isinstance(d, SpikeDetector) and d.config.signal == keys.GRAD_NORM else d
        for d in default_detectors()
    ]


def _poisoned_epoch(cfg: PoisonConfig, data: IndexedWindows, folder: Path) -> keel.Guard:
    model, opt = _model(cfg)
    guard = _guard(cfg, model, opt, folder)
    for step, ids in enumerate(batched(data.order(0), cfg.batch_size)):
        batch = data.batch(ids)
        loss = example_losses(model, batch).mean()
        loss.backward()
        if step == cfg.fault_step:  # this computation's gradient only: the same batch recomputed is fine
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(FAULT_SCALE)
        guard.step(loss, batch_ids=ids, batch=batch)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return guard


def _resumed(cfg: PoisonConfig, data: IndexedWindows, folder: Path, poisoned: set[int]) -> tuple[nn.Module, int, int]:
    """Epochs 2.. resumed from the first epoch's disk snapshot, through the skip list: (model, step, drawn)."""
    model, opt = _model(cfg)
    guard = _guard(cfg, model, opt, folder, resume=True)
    resumed_from, drawn = guard.global_step, 0
    for epoch in range(1, cfg.epochs):
        for ids in batched(SkipListSampler(data.order(epoch), folder), cfg.batch_size):
            drawn += sum(i in poisoned for i in ids)
            batch = data.batch(ids)
            loss = example_losses(model, batch).mean()
            loss.backward()
            guard.step(loss, batch_ids=ids, batch=batch)
            opt.zero_grad(set_to_none=True)
    guard.close()
    return model, resumed_from, drawn


def _bare(cfg: PoisonConfig, data: IndexedWindows, order: Any, poisoned: set[int]) -> tuple[nn.Module, int]:
    """Every epoch, bare loop, over ``order(epoch)``: (model, poisoned ids drawn)."""
    model, opt = _model(cfg)
    drawn = 0
    for epoch in range(cfg.epochs):
        for ids in batched(order(epoch), cfg.batch_size):
            drawn += sum(i in poisoned for i in ids)
            example_losses(model, data.batch(ids)).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model, drawn


def _evaluator(cfg: PoisonConfig) -> Any:
    held_out = ProxyBatches(batch_size=32, seq_len=cfg.seq_len, seed=cfg.seed + 1, split="val")
    batches = [held_out.next() for _ in range(cfg.eval_batches)]

    def evaluate(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float(torch.stack([example_losses(model, b).mean() for b in batches]).mean())

    return evaluate


def _attributed(guard: keel.Guard) -> list[dict[str, Any]]:
    """One record per step whose findings carry offenders (the findings of a step share them)."""
    by_step: dict[int, dict[str, Any]] = {}
    for f in guard.findings:
        if "offenders" not in f.evidence or f.step in by_step:
            continue
        # the step's findings: replay marks only the critical ones, attribution every spike (info ones too)
        replay = next(
            (g.evidence["replay"] for g in guard.findings if g.step == f.step and "replay" in g.evidence), None
        )
        by_step[f.step] = {
            "step": f.step,
            "kind": f.kind,
            "severity": f.severity,
            "offenders": f.evidence["offenders"],
            "offenders_by_grad_norm": f.evidence.get("offenders_by_grad_norm", []),
            "replay": "not replayed" if replay is None else "data" if replay["reproducible"] else "transient",
        }
    return sorted(by_step.values(), key=lambda a: a["step"])


def _fault(guard: keel.Guard, step: int | None) -> dict[str, Any]:
    if step is None:
        return {}
    decision = next((d for d in guard.decisions if d.step == step), None)
    replays = [f.evidence["replay"] for f in guard.findings if f.step == step and "replay" in f.evidence]
    verdict = "not replayed" if not replays else "data" if replays[0]["reproducible"] else "transient"
    return {
        "step": step,
        "verdict": verdict,
        "action": decision.action if decision else "ok",
        "reason": decision.reason[:160] if decision else "",
        "replay": replays[0] if replays else None,
    }


def _scores(
    attributed: list[dict[str, Any]], skip_entries: list[dict[str, Any]], poisoned: set[int]
) -> dict[str, dict[str, float | int]]:
    from keel._core.example_ids import parse_ids

    attributed = [a for a in attributed if a["replay"] != "transient"]  # keel skip-lists none of those either
    named = {o["id"] for a in attributed for o in a["offenders"]}
    outliers = {o["id"] for a in attributed for o in a["offenders"] if o["outlier"]}
    by_grad = {o["id"] for a in attributed for o in a["offenders_by_grad_norm"] if o["outlier"]}
    listed = {i for e in skip_entries if e["kind"] == "examples" for i in parse_ids(e["ids"])}
    return {
        "top_k": _precision_recall(named, poisoned),
        "outliers": _precision_recall(outliers, poisoned),
        "outliers_by_grad_norm": _precision_recall(by_grad, poisoned),
        "skip_list": _precision_recall(listed, poisoned),
    }


def _precision_recall(found: Iterable[int], truth: set[int]) -> dict[str, float | int]:
    found = set(found)
    hits = len(found & truth)
    return {
        "named": len(found),
        "poisoned_named": hits,
        "precision": round(hits / len(found), 4) if found else math.nan,
        "recall": round(hits / len(truth), 4) if truth else math.nan,
    }
