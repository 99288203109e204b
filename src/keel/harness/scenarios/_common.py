"""What every scenario shares: its description, its result, and a guarded proxy-LM training loop.

Each scenario is a real training run of a small model under `Guard(policy="observe")` with keel's transformer
probe set and default detectors (plus the probes a scenario needs, such as sharpness): detection must come from
what a user would get, not from a detector tuned for one trace.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel._core.finding import Finding, severity_rank
from keel.detect import default_detectors
from keel.guard import Guard
from keel.proxy.corpus import ProxyBatches
from keel.proxy.model import create_proxy_model
from keel.signals import TRANSFORMER_PROBES, Probe


@dataclass(frozen=True, kw_only=True)
class ScenarioSpec:
    """What a scenario is and what keel should say about it.

    Attributes:
        name: The registry name (the file stem).
        healthy: True for a healthy run with a nuisance: no warning or critical finding is allowed.
        expected_kind: The finding kind that names the instability (None when healthy).
        summary: One line: the setting and the mechanism.
        lead_required: The detection must come before the loss degrades (predictive detectors).
        remedy: What the reference ("fixed") run changes, when the scenario has one.
    """

    name: str
    healthy: bool
    expected_kind: str | None
    summary: str
    lead_required: bool = False
    remedy: str = ""


@dataclass
class ScenarioResult:
    """One scenario run: the loss curve, what keel found, and the known event step if any."""

    name: str
    losses: list[float]
    findings: list[Finding]
    wall_s: float
    event_step: int | None = None
    reference_losses: list[float] | None = None
    values: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def alarms(self) -> list[Finding]:
        """Warning and critical findings, in step order."""
        return [f for f in self.findings if severity_rank(f.severity) >= 1]


Batch = tuple[Tensor, Tensor]


@dataclass(kw_only=True)
class LMRun:
    """A guarded run of keel's byte-level proxy LM (the knobs scenarios turn).

    Attributes:
        size: Proxy size.
        steps: Optimizer steps.
        lr: Peak learning rate.
        warmup: Linear warm-up steps; then cosine to ``min_lr_ratio`` unless ``constant``.
        lr_factor: Extra multiplier of the LR per step (an LR spike, a ramp); None: 1.
        batch_size, seq_len: Batch shape.
        weight_decay, beta2, eps: AdamW settings.
        qk_norm: QK-norm in the model.
        z_loss: z-loss coefficient (0: off).
        head_lr_mult: LR multiplier of the output head (a mis-scaled output layer, as µP warns of).
        batch_fn: Replaces the batch of a step: ``batch_fn(step, batch) -> batch``.
        model_fn: Edits the model after construction (``model_fn(model) -> model``).
        extra_probes: Probes added to keel's defaults.
        seed: Seeds model, data and everything random.
        record: Signal keys whose values are kept in the result.
    """

    size: str = "tiny"
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    constant: bool = False
    lr_factor: Callable[[int], float] | None = None
    batch_size: int = 16
    seq_len: int = 64
    weight_decay: float = 0.0
    beta2: float = 0.95
    eps: float = 1e-8
    qk_norm: bool = False
    z_loss: float = 0.0
    head_lr_mult: float = 1.0
    batch_fn: Callable[[int, Batch], Batch] | None = None
    model_fn: Callable[[nn.Module], nn.Module] | None = None
    extra_probes: Callable[[nn.Module, Callable[[], Tensor]], Sequence[Probe]] | None = None
    seed: int = 0
    record: tuple[str, ...] = ()


def lr_multiplier(run: LMRun, step: int) -> float:
    if step < run.warmup:
        base = (step + 1) / run.warmup
    elif run.constant:
        base = 1.0
    else:
        progress = min(1.0, (step - run.warmup) / max(1, run.steps - run.warmup))
        base = run.min_lr_ratio + (1 - run.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return base * (run.lr_factor(step) if run.lr_factor is not None else 1.0)


def lm_loss(logits: Tensor, targets: Tensor, z_loss: float = 0.0) -> Tensor:
    """Next-byte cross-entropy, plus ``z_loss · mean(log Z)²`` when asked (PaLM's z-loss)."""
    flat = logits.flatten(0, -2).float()
    loss = F.cross_entropy(flat, targets.flatten())
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(flat, dim=-1).square().mean()
    return loss


def run_lm(name: str, run: LMRun, *, guarded: bool = True, run_dir: str | None = None) -> ScenarioResult:
    """Train the proxy LM of ``run`` under an observing `Guard` and collect what keel found."""
    torch.manual_seed(run.seed)
    model: nn.Module = create_proxy_model(run.size, seq_len=run.seq_len, qk_norm=run.qk_norm)
    if run.model_fn is not None:
        model = run.model_fn(model)
    head = set(id(p) for p in model.head.parameters()) if hasattr(model, "head") else set()
    trainable = [p for p in model.parameters() if p.requires_grad]  # a LoRA model_fn freezes its base
    groups = [{"params": [p for p in trainable if id(p) not in head]},
              {"params": [p for p in trainable if id(p) in head], "lr": run.lr * run.head_lr_mult}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=run.lr, betas=(0.9, run.beta2),
                                  eps=run.eps, weight_decay=run.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(run, s))
    batches = ProxyBatches(batch_size=run.batch_size, seq_len=run.seq_len, seed=run.seed)
    probe_batch = ProxyBatches(batch_size=8, seq_len=run.seq_len, seed=run.seed + 7919).next()

    def probe_loss() -> Tensor:  # the sharpness probe's fixed batch
        return lm_loss(model(probe_batch[0]), probe_batch[1], run.z_loss)

    probes: list[str | Probe] = list(TRANSFORMER_PROBES)
    if run.extra_probes is not None:
        probes += list(run.extra_probes(model, probe_loss))
    guard = Guard(model, optimizer, scheduler, policy="observe", probes=probes, run_dir=run_dir,
                  detectors=default_detectors()) if guarded else None
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(run.steps):
        batch = batches.next()
        if run.batch_fn is not None:
            batch = run.batch_fn(step, batch)
        loss = lm_loss(model(batch[0]), batch[1], run.z_loss)
        loss.backward()
        if guard is not None:
            guard.step(loss)
        else:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    findings: list[Finding] = []
    if guard is not None:
        guard.close()
        findings = list(guard.findings)
    return ScenarioResult(name=name, losses=losses, findings=findings, wall_s=time.perf_counter() - start)


def as_dict(result: ScenarioResult) -> dict[str, Any]:
    return {"name": result.name, "steps": len(result.losses), "wall_s": round(result.wall_s, 2),
            "alarms": [(f.step, f.kind, f.severity) for f in result.alarms()]}


class LMScenario:
    """Base of the proxy-LM scenarios: a recipe, optionally a fixed recipe, optionally a known event step."""

    spec: ScenarioSpec
    event_step: int | None = None

    def recipe(self, seed: int) -> LMRun:
        """The unstable (or healthy) run this scenario trains; every scenario module defines its own."""
        raise NotImplementedError(f"{type(self).__name__} defines no recipe")

    def fixed(self, seed: int) -> LMRun | None:
        """The recipe with the remedy applied (the reference run), or None."""
        return None

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        recipe = self.recipe(seed)
        if steps is not None:
            recipe = replace(recipe, steps=steps)
        result = run_lm(self.spec.name, recipe)
        result.event_step = self.event_step
        return result

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        recipe = self.fixed(seed)
        if recipe is None:
            return None
        if steps is not None:
            recipe = replace(recipe, steps=steps)
        return run_lm(self.spec.name, recipe, guarded=False).losses
