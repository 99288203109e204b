"""A minimal proxy trainer that uses `Guard` exactly as a user's loop would.

Warm-up then cosine decay, AdamW, next-byte cross-entropy on the stdlib corpus. With ``policy=None`` it is the
bare loop with no keel at all, the baseline keel is measured against.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from keel._core.decision import Decision
from keel._core.errors import TrainingAborted
from keel._core.finding import Finding
from keel._core.validate import check_types, require_ints, require_positive
from keel.guard import Guard
from keel.losses import z_loss
from keel.nn import stabilize
from keel.nn.remedies import remedies
from keel.optim import create_optimizer, list_optimizers
from keel.proxy.corpus import ProxyBatches
from keel.proxy.model import ProxyGPT, create_proxy_model


@dataclass(kw_only=True)
class TrainConfig:
    """A proxy training recipe.

    Attributes:
        size: Proxy model size (`keel.proxy.list_proxy_sizes`).
        steps: Optimizer steps.
        batch_size: Sequences per step.
        seq_len: Bytes per sequence.
        lr: Peak learning rate.
        warmup: Linear warm-up steps.
        min_lr_ratio: Cosine decay floor as a fraction of ``lr``.
        weight_decay: AdamW (decoupled) weight decay; for ``independent_adamw`` the independent λ.
        beta2: AdamW β₂ (β₁ is 0.9).
        qk_norm: LayerNorm on queries and keys.
        optimizer: ``"adamw"`` (``torch.optim.AdamW``) or a `keel.optim.list_optimizers` name, built with
            the same ``lr``, ``betas`` and ``weight_decay``.
        z_loss: z-loss coefficient added to the training loss (`keel.losses.z_loss`; 1e-4 in PaLM and
            Wortsman et al.); 0 adds nothing. The validation loss is the plain cross-entropy either way.
        stabilize: `keel.nn.stabilize` remedies applied to the built model and its optimizer before training,
            the z_loss remedy's term added to the training loss: the surgery path a user's model takes.
            ``("qk_norm", "z_loss")`` computes what ``qk_norm=True, z_loss=1e-4`` does; give one or the other.
        max_grad_norm: Global gradient-norm clipping; ``None`` does not clip.
        eval_batches: Validation batches for the final loss.
        seed: Seeds the model init and the data order.
    """

    size: str = "small"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 1e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta2: float = 0.95
    qk_norm: bool = False
    optimizer: str = "adamw"
    z_loss: float = 0.0
    stabilize: tuple[str, ...] = ()
    max_grad_norm: float | None = None
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "steps", "batch_size", "seq_len", "eval_batches")
        require_positive(self, "lr")
        if self.optimizer != "adamw" and self.optimizer not in list_optimizers():
            raise ValueError(f"TrainConfig.optimizer={self.optimizer!r}; allowed: adamw, "
                             f"{', '.join(list_optimizers())}")
        if not (0.0 <= self.z_loss < math.inf):
            raise ValueError(f"TrainConfig.z_loss={self.z_loss!r}; allowed: a finite number >= 0")
        self.stabilize = tuple(self.stabilize)
        if any(r not in remedies for r in self.stabilize):
            raise ValueError(f"TrainConfig.stabilize={self.stabilize!r}; allowed: names from "
                             f"{', '.join(remedies.names())}")
        for name, field_set in (("qk_norm", self.qk_norm), ("z_loss", self.z_loss > 0)):
            if field_set and name in self.stabilize:  # it would act twice, or warn that it matched nothing
                raise ValueError(f"TrainConfig.stabilize={self.stabilize!r} with "
                                 f"{name}={getattr(self, name)!r}; allowed: {name!r} in one of the two")


@dataclass
class ProxyRun:
    """The outcome of one proxy run."""

    config: TrainConfig
    policy: str | None
    losses: list[float] = field(default_factory=list)
    val_loss: float = math.nan
    wall_s: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    aborted: str | None = None
    run_dir: str | None = None


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def evaluate(model: ProxyGPT, config: TrainConfig) -> float:
    """Mean next-byte cross-entropy over ``eval_batches`` held-out batches (same batches for every run)."""
    batches = ProxyBatches(batch_size=config.batch_size, seq_len=config.seq_len, seed=1234, split="val")
    model.eval()
    with torch.no_grad():
        total = sum(_loss(model, *batches.next()).item() for _ in range(config.eval_batches))
    model.train()
    return total / config.eval_batches


def train_proxy(
    config: TrainConfig,
    *,
    policy: str | None = None,
    run_dir: str | None = None,
    progress: Callable[[int, float], None] | None = None,
    batch_hook: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    **guard_options: object,
) -> ProxyRun:
    """Train one proxy model; under `Guard` with ``policy``, or bare when ``policy`` is None.

    Args:
        config: The recipe.
        policy: A `Guard` policy, or None for the bare loop without keel.
        run_dir: Where the Guard writes its run store.
        progress: Called as ``progress(step, loss)`` after every step.
        batch_hook: Called as ``batch_hook(step, x, y)`` and returns the batch to train on (fault injection:
            a poisoned data stream).
        **guard_options: Passed to `Guard` (``probes``, ``log_every``, ...).

    Example:
        >>> run = train_proxy(TrainConfig(size="tiny", steps=3, eval_batches=1), policy="observe")
        >>> len(run.losses)
        3
    """
    torch.manual_seed(config.seed)
    model = create_proxy_model(config.size, seq_len=config.seq_len, qk_norm=config.qk_norm)
    optimizer = _create_optimizer(model, config)
    stabilized = stabilize(model, config.stabilize, optimizer=optimizer) if config.stabilize else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    batches = ProxyBatches(batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
    guard = None
    if policy is not None:
        guard_options.setdefault("probes", "transformer")  # the proxy is a transformer: watch its attention
        guard = Guard(model, optimizer, scheduler, run_dir=run_dir, policy=policy,  # type: ignore[arg-type]
                      max_grad_norm=config.max_grad_norm, config=asdict(config), seed=config.seed,
                      **guard_options)  # type: ignore[arg-type]
        guard.track(batches)
    run = ProxyRun(config=config, policy=policy, run_dir=run_dir)
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            x, y = batches.next()
            if batch_hook is not None:
                x, y = batch_hook(step, x, y)
            loss = _loss(model, x, y, config.z_loss)
            if stabilized is not None and stabilized.z_loss_hooks:
                loss = loss + stabilized.z_loss()
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.losses.append(loss.item())
            if progress is not None:
                progress(step, run.losses[-1])
    except TrainingAborted as exc:
        run.aborted = str(exc)
    finally:
        if guard is not None:
            guard.close()
            run.findings, run.decisions = guard.findings, guard.decisions
    run.wall_s = time.perf_counter() - start
    run.val_loss = evaluate(model, config)
    return run


def _create_optimizer(model: ProxyGPT, config: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.lr, betas=(0.9, config.beta2), weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), **kwargs)  # type: ignore[arg-type]
    return create_optimizer(config.optimizer, model.parameters(), **kwargs)


def _loss(model: ProxyGPT, x: torch.Tensor, y: torch.Tensor, z_loss_coefficient: float = 0.0) -> torch.Tensor:
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return loss + z_loss(logits, coefficient=z_loss_coefficient) if z_loss_coefficient > 0 else loss
