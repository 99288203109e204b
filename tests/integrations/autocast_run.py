"""One small training loop under ``torch.autocast``, bare or under a `Guard`: shared by the CPU autocast tests
(`tests/integrations/test_autocast.py`) and their CUDA twins (`tests/gpu/test_cuda_autocast.py`).

keel's tiny proxy LM keeps float32 parameters; the forward pass and the loss run under autocast (bf16 or fp16
activations and logits, the loss in float32 as autocast computes cross-entropy), ``backward()`` and
``guard.step()`` outside it, as PyTorch's AMP recipe has them. With ``dtype=None`` the same loop runs in float32:
the reference the autocast runs are compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from keel._core.decision import Decision
from keel.guard import Guard
from keel.proxy import create_proxy_model
from keel.recover import RecoveryConfig
from keel.signals import DEFAULT_PROBES, FULL_PROBES, TRANSFORMER_PROBES, Probe, create_probe

PROBE_SETS = {"default": DEFAULT_PROBES, "transformer": TRANSFORMER_PROBES, "full": FULL_PROBES}
POISONED_BLOCK = "blocks.1"  # the block whose output is NaN on a poisoned step


def every_step(names: tuple[str, ...]) -> list[Probe]:
    """The probes of a set, each measuring at every step (so a few steps see every signal)."""
    probes = [create_probe(name) for name in names]
    for probe in probes:
        for cadence in ("every", "fused_every"):
            if hasattr(getattr(probe, "config", None), cadence):
                setattr(probe.config, cadence, 1)
    return probes


@dataclass(kw_only=True)
class Setup:
    """One run.

    Attributes:
        device: Where the model and the data live.
        dtype: The autocast dtype; ``None`` runs without autocast (float32).
        probes: A probe set (``PROBE_SETS``), its probes measuring at every step; ``None`` is the bare loop.
        policy: The guard's policy.
        steps: Optimizer steps.
        poison: Steps whose ``blocks.1`` output is NaN (loss and gradients follow).
        skip: Steps whose update the bare loop leaves out (what a guard's skip should equal); no scaler.
        init_scale: A ``torch.amp.GradScaler(device, init_scale=...)`` drives the loop; ``None``: no scaler.
        recovery: The guard's snapshot settings.
        max_consecutive_skips: The guard's skip limit.
    """

    device: str = "cpu"
    dtype: torch.dtype | None = torch.bfloat16
    probes: str | None = "default"
    policy: str = "observe"
    steps: int = 6
    poison: tuple[int, ...] = ()
    skip: tuple[int, ...] = ()
    init_scale: float | None = None
    recovery: RecoveryConfig | None = None
    max_consecutive_skips: int = 10


@dataclass
class Result:
    """What a run did: every value the guard recorded (``key@step``), the losses, the decisions, the parameters at
    the start of each step (host copies) and the scale before each step; the live objects at the end."""

    values: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    starts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    model: Any = None
    optimizer: Any = None
    scaler: Any = None
    guard: Guard | None = None

    def non_finite(self, step: int) -> dict[str, float]:
        """The values recorded for ``step`` that are not finite."""
        return {k: v for k, v in self.values.items() if k.endswith(f"@{step}") and not math.isfinite(v)}


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        f"{i}/{k}": v.detach().to("cpu", copy=True)
        for i, state in optimizer.state_dict()["state"].items()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def batches(steps: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (4, 17), generator=gen).to(device) for _ in range(steps)]


def train(setup: Setup) -> Result:
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16).to(setup.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(setup.device, init_scale=setup.init_scale) if setup.init_scale else None
    out = Result(model=model, optimizer=optimizer, scaler=scaler)
    poisoned = [False]
    block = dict(model.named_modules())[POISONED_BLOCK]
    block.register_forward_hook(lambda module, args, output: output * math.nan if poisoned[0] else None)
    if setup.probes is not None:
        out.guard = Guard(
            model,
            optimizer,
            policy=setup.policy,
            scaler=scaler,
            log_every=1,
            probes=every_step(PROBE_SETS[setup.probes]),
            recovery=setup.recovery,
            max_consecutive_skips=setup.max_consecutive_skips,
        )
        _capture(out.guard, out.values)
    for step, batch in enumerate(batches(setup.steps, setup.device)):
        out.starts.append(params(model))
        out.scales.append(scaler.get_scale() if scaler is not None else 1.0)
        poisoned[0] = step in setup.poison
        with torch.autocast(setup.device, dtype=setup.dtype or torch.float32, enabled=setup.dtype is not None):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if out.guard is not None:
            out.decisions.append(out.guard.step(loss))
        elif step not in setup.skip:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.losses.append(loss.item())
    if out.guard is not None:
        out.guard.close()
    return out


def _capture(guard: Guard, values: dict[str, float]) -> None:
    """Keep every value the guard records (scalars and per-parameter families, after-step ones included)."""
    recorder = guard.recorder
    record_step, record_late = recorder.step, recorder.late

    def keep(obs) -> None:
        values.update({f"{key}@{obs.step}": value for key, value in obs.values.items()})
        for family in obs.per_param:
            values.update({f"{key}@{obs.step}": value for key, value in obs.expand(family).items()})

    def step(obs, decision) -> None:
        keep(obs)
        record_step(obs, decision)

    def late(obs) -> None:
        keep(obs)
        record_late(obs)

    recorder.step, recorder.late = step, late
